"""`alignclip prepare`: list a dataset folder, split it by its protocol, write a manifest and its metadata.

Output (``OUT_DIR``):
* ``manifest.parquet``: one row per image: ``path`` (relative to the dataset root), ``label`` (index into the
  class list of the metadata), ``class_name``, ``domain``, ``split`` (train / val / test), ``subset`` (base /
  new), and for few-shot protocols one boolean column ``shots_seed<k>`` per sampling seed.
* ``meta.json``: dataset, protocol, root, prompt template, class names, base and new classes, domains, the
  protocol settings that the protocol used (and only those), the prompt conventions, and the counts.

Nothing is decoded here (``validate_images`` is a separate, parallel, optional pass), so a DomainNet-sized tree
prepares in seconds. Images stay where they are: the manifest points into the user's folder or S3 prefix.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from alignclip import artifacts, storage
from alignclip.config import DEFAULTS
from alignclip.data import splits
from alignclip.data.registry import (
    CLASS_NAME_CHOICES, DATASETS, LAYOUT_KINDS, TEMPLATE_CHOICES, clean_class_name, default_protocol, get_dataset,
)
from alignclip.log import get_logger
from alignclip.clip_factory import RESOURCES
from alignclip.protocols import PROTOCOLS

log = get_logger(__name__)

LISTINGS = ("sorted", "filesystem")


@dataclass
class PrepareSettings:
    dataset: str
    root: str
    protocol: str = ""  # default: the dataset's own (domainbed / base2new / imagenet)
    holdout_fraction: float = DEFAULTS["data_holdout_fraction"]
    trial_seed: int = DEFAULTS["data_trial_seed"]  # domainbed: DomainBed's trial seed; wild: the seed of CLIPood's split (0 = CLIPood's own)
    shots: int = DEFAULTS["data_shots"]
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    template: str | None = None  # a template of your own; default: the dataset's, per ``templates``
    split_file: str | None = None
    variants: dict[str, str] = field(default_factory=dict)  # imagenet: variant name -> folder
    templates: str = DEFAULTS["data_templates"]  # paper: appendix A.2 | release: the released code's (CoOp's CUSTOM_TEMPLATES)
    class_names: str = DEFAULTS["data_class_names"]  # paper: '_' and '-' -> ' ' (A.2) | release: only '_' -> ' '
    listing: str = DEFAULTS["data_listing"]  # imagenet: image order within a class folder for few-shot picks (see prepare_imagenet)
    name: str | None = None  # the dataset's name in results (default: ``dataset``); custom data under a layout kind


class DatasetError(ValueError):
    """Bad input in a dataset folder; the message names the folder or file and what was expected."""


# ---------------------------------------------------------------------------------------------- DomainBed


def _domainbed_listing(root: str) -> tuple[list[str], list[str], dict[str, list[tuple[str, str]]]]:
    """Environments, classes and per-environment (path, class) lists in torchvision ImageFolder order."""
    files = storage.list_files(root)
    by_env: dict[str, dict[str, list[tuple[str, str, str]]]] = {}
    for rel in files:
        parts = PurePosixPath(rel).parts
        if len(parts) < 3:
            continue  # files at the top or directly in an environment folder are not images of a class
        env, cls = parts[0], parts[1]
        by_env.setdefault(env, {}).setdefault(cls, []).append(("/".join(parts[2:-1]), parts[-1], rel))
    envs = storage.list_dirs(root)
    if not envs:
        raise DatasetError(f"{root}: no domain folders; expected DomainBed's layout <root>/<domain>/<class>/<image>")
    class_sets = {}
    for env in envs:
        class_dirs = storage.list_dirs(storage.join(root, env))
        empty = [c for c in class_dirs if c not in by_env.get(env, {})]
        if empty:
            raise DatasetError(
                f"{storage.join(root, env)}: class folder(s) {empty} hold no image files "
                f"(expected {', '.join(storage.IMG_EXTENSIONS)})"
            )
        class_sets[env] = class_dirs
    reference_env = envs[0]
    for env in envs[1:]:
        if class_sets[env] != class_sets[reference_env]:
            missing = sorted(set(class_sets[reference_env]) - set(class_sets[env]))
            extra = sorted(set(class_sets[env]) - set(class_sets[reference_env]))
            raise DatasetError(
                f"{root}: domains {reference_env!r} and {env!r} have different classes "
                f"(missing in {env!r}: {missing}; only in {env!r}: {extra}); every domain must hold the same class folders"
            )
    classes = class_sets[reference_env]
    ordered: dict[str, list[tuple[str, str]]] = {}
    for env in envs:
        rows = []
        for cls in classes:  # ImageFolder: sorted classes, then sorted(os.walk) dirs, then sorted file names
            for _, _, rel in sorted(by_env[env][cls]):
                rows.append((rel, cls))
        ordered[env] = rows
    return envs, classes, ordered


def prepare_domainbed(settings: PrepareSettings, wild: bool) -> tuple[pd.DataFrame, dict]:
    envs, classes, ordered = _domainbed_listing(settings.root)
    spec = get_dataset(settings.dataset)
    if spec.domains and sorted(spec.domains) != envs:
        log.warning("%s: domains %s differ from the usual %s", settings.root, envs, sorted(spec.domains))
    class_index = {c: i for i, c in enumerate(classes)}
    n_base = int(0.5 * len(classes)) if wild else len(classes)
    frames = []
    for env_index, env in enumerate(envs):
        rows = ordered[env]
        paths = np.array([r[0] for r in rows], dtype=object)
        labels = np.array([class_index[r[1]] for r in rows], dtype=np.int64)
        split = np.empty(len(rows), dtype=object)
        if wild:
            # CLIPood: split the base-class and the open-class subsets of each environment separately.
            for name, mask in (("base", labels < n_base), ("open", labels >= n_base)):
                positions = np.flatnonzero(mask)
                # CLIPood fixes trial seed 0 here; another trial seed is our extension (0 reproduces CLIPood)
                out, inn = splits.domainbed_holdout(
                    len(positions), settings.holdout_fraction, splits.seed_hash(settings.trial_seed, env_index, name)
                )
                split[positions[out]] = "val"
                split[positions[inn]] = "train"
        else:
            out, inn = splits.domainbed_holdout(
                len(rows), settings.holdout_fraction, splits.seed_hash(settings.trial_seed, env_index)
            )
            split[out] = "val"
            split[inn] = "train"
        frames.append(
            pd.DataFrame(
                {
                    "path": paths,
                    "label": labels,
                    "class_name": [clean_class_name(classes[y], settings.class_names) for y in labels],
                    "domain": env,
                    "split": split,
                    "subset": np.where(labels < n_base, "base", "new"),
                    "env_index": np.arange(len(rows), dtype=np.int64),  # position in DomainBed's ImageFolder
                }
            )
        )
    manifest = pd.concat(frames, ignore_index=True)
    meta = {
        "classes": [clean_class_name(c, settings.class_names) for c in classes],
        "class_folders": classes,
        "base_classes": list(range(n_base)),
        "new_classes": list(range(n_base, len(classes))),
        "domains": envs,
    }
    return manifest, meta


# ---------------------------------------------------------------------------------------------- CoOp


def _read_coop_split(settings: PrepareSettings, spec) -> dict[str, list]:
    if settings.dataset == "fgvc_aircraft" and not settings.split_file:
        return _read_fgvc(settings.root)
    split_name = settings.split_file or spec.split_file
    split_path = split_name if ("/" in split_name) else storage.join(settings.root, split_name)
    if not storage.exists(split_path):
        raise DatasetError(f"split file not found: {split_path} (CoOp's split_zhou_*.json for {settings.dataset})")
    try:
        split = json.loads(storage.read_text(split_path))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{split_path}: not valid JSON ({err})") from err
    for key in ("train", "val", "test"):
        if key not in split or not isinstance(split[key], list):
            raise DatasetError(f"{split_path}: missing list {key!r}; expected keys train/val/test of [path, label, classname]")
    for key in ("train", "val", "test"):
        for entry in split[key][:1]:
            if not (isinstance(entry, list) and len(entry) == 3):
                raise DatasetError(f"{split_path}: {key} entries must be [image_path, label, classname], got {entry!r}")
    return split


def _read_fgvc(root: str) -> dict[str, list]:
    """FGVCAircraft as CoOp reads it: variants.txt (class order) and images_variant_<split>.txt."""
    variants_path = storage.join(root, "variants.txt")
    if not storage.exists(variants_path):
        raise DatasetError(f"{variants_path} not found (FGVCAircraft layout: variants.txt, images_variant_*.txt, images/)")
    classnames = [line.strip() for line in storage.read_text(variants_path).splitlines() if line.strip()]
    cname2lab = {c: i for i, c in enumerate(classnames)}
    out = {}
    for key in ("train", "val", "test"):
        entries = []
        for line in storage.read_text(storage.join(root, f"images_variant_{key}.txt")).splitlines():
            if not line.strip():
                continue
            imname, _, classname = line.strip().partition(" ")
            entries.append([imname + ".jpg", cname2lab[classname], classname])
        out[key] = entries
    return out


def prepare_coop(settings: PrepareSettings) -> tuple[pd.DataFrame, dict]:
    spec = get_dataset(settings.dataset)
    split = _read_coop_split(settings, spec)
    image_root = storage.join(settings.root, spec.image_dir) if spec.image_dir else settings.root
    return _coop_manifest(settings, split, image_root, spec.image_dir)


def _coop_manifest(settings: PrepareSettings, split: dict, image_root: str, image_dir: str):
    names: dict[int, str] = {}
    for key in ("train", "val", "test"):
        for _, label, classname in split[key]:
            names.setdefault(int(label), classname)
    labels_all = sorted(names)
    if labels_all != list(range(len(labels_all))):
        raise DatasetError(f"{settings.dataset}: split labels must be 0..C-1, got {labels_all[:5]}...")
    listed = set(storage.list_files(image_root))
    missing = [p for key in ("train", "val", "test") for p, _, _ in split[key] if p not in listed]
    if missing:
        raise DatasetError(
            f"{settings.dataset}: the split file names {len(missing)} image(s) missing under {image_root}, "
            f"e.g. {missing[:5]}"
        )
    base, new = splits.coop_base_new([e[1] for e in split["train"]])
    base_set = set(base)
    frames = []
    for key in ("train", "val", "test"):
        entries = split[key]
        frame = pd.DataFrame(
            {
                "path": [f"{image_dir}/{p}" if image_dir else p for p, _, _ in entries],
                "label": np.array([int(e[1]) for e in entries], dtype=np.int64),
                "domain": settings.dataset,
                "split": key,
            }
        )
        frames.append(frame)
    train_labels = frames[0]["label"].tolist()
    val_labels = frames[1]["label"].tolist()
    for seed in settings.seeds:
        train_idx, val_idx = splits.coop_fewshot(train_labels, val_labels, settings.shots, seed)
        column = f"shots_seed{seed}"
        for frame, chosen in ((frames[0], train_idx), (frames[1], val_idx)):
            mark = np.zeros(len(frame), dtype=bool)
            mark[chosen] = True
            frame[column] = mark
        frames[2][column] = True  # the test split is never subsampled
    manifest = pd.concat(frames, ignore_index=True)
    classes = [clean_class_name(names[i], settings.class_names) for i in labels_all]
    manifest["class_name"] = [classes[y] for y in manifest["label"]]
    manifest["subset"] = np.where(manifest["label"].isin(base_set), "base", "new")
    meta = {"classes": classes, "base_classes": base, "new_classes": new, "domains": [settings.dataset]}
    return manifest, meta


# ---------------------------------------------------------------------------------------------- ImageNet

VARIANT_FOLDERS = {  # CoOp's folder names below the data root's parent; override with settings.variants
    "imagenet_v2": "imagenetv2/imagenetv2-matched-frequency-format-val",
    "imagenet_sketch": "imagenet-sketch/images",
    "imagenet_a": "imagenet-adversarial/imagenet-a",
    "imagenet_r": "imagenet-rendition/imagenet-r",
}


def imagenet_classes() -> tuple[list[str], list[str]]:
    """(wnids, names) of the 1,000 ImageNet classes in label order (CoOp's classnames.txt)."""
    wnids, names = [], []
    for line in (RESOURCES / "imagenet_classnames.txt").read_text().splitlines():
        wnid, _, name = line.partition(" ")
        wnids.append(wnid)
        names.append(name.strip())
    return wnids, names


def imagenet_subset(variant: str) -> list[str]:
    """WordNet ids of the 200 classes of ImageNet-A or ImageNet-R."""
    return (RESOURCES / f"{variant}_wnids.txt").read_text().split()


def filesystem_listing(root: str) -> list[str]:
    """``<class>/<file>`` in CoOp's order: class folders sorted (datasets/imagenet.py ``read_data``), the images
    of each folder in ``os.listdir`` order without hidden names (Dassl's ``listdir_nohidden``, unsorted), which
    depends on the filesystem. Image suffixes only, as the sorted listing."""
    if storage.is_s3(root):
        raise DatasetError(f"{root}: listing=filesystem needs a local folder (an S3 listing has no filesystem order)")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    files = []
    for folder in sorted(e.name for e in os.scandir(root) if e.is_dir()):
        for name in os.listdir(os.path.join(root, folder)):
            if not name.startswith(".") and name.lower().endswith(storage.IMG_EXTENSIONS):
                files.append(f"{folder}/{name}")
    return files


def prepare_imagenet(settings: PrepareSettings, base2new: bool) -> tuple[pd.DataFrame, dict]:
    """ImageNet's train/val folders (and the variants). Few-shot picks are positions in the training listing, so
    they depend on its order: ``listing="sorted"`` (default) sorts the file names, the same on every machine;
    ``"filesystem"`` takes CoOp's order (its picks differ from one filesystem to another)."""
    wnids, names = imagenet_classes()
    index = {w: i for i, w in enumerate(wnids)}
    frames = [_imagenet_split(settings, split_name, folder, index) for split_name, folder in (("train", "train"), ("test", "val"))]
    train = frames[0]
    for seed in settings.seeds:
        chosen, _ = splits.coop_fewshot(train["label"].tolist(), [], settings.shots, seed)
        mark = np.zeros(len(train), dtype=bool)
        mark[chosen] = True
        train[f"shots_seed{seed}"] = mark
        frames[1][f"shots_seed{seed}"] = True
    extra_roots = {}
    if not base2new:
        for variant, (frame, vroot) in _imagenet_variants(settings, index, len(wnids)).items():
            frames.append(frame)
            extra_roots[variant] = vroot  # where load_prepared lets this variant's absolute rows be read
    manifest = pd.concat(frames, ignore_index=True)
    classes = [clean_class_name(n, settings.class_names) for n in names]
    manifest["class_name"] = [classes[y] for y in manifest["label"]]
    if base2new:
        base, new = splits.coop_base_new(range(len(classes)))
    else:
        base, new = list(range(len(classes))), []
    manifest["subset"] = np.where(manifest["label"].isin(set(base)), "base", "new")
    meta = {
        "classes": classes,
        "wnids": wnids,
        "base_classes": base,
        "new_classes": new,
        "domains": sorted(manifest["domain"].unique().tolist()),
        "label_subsets": {v: [index[w] for w in imagenet_subset(v)] for v in ("imagenet_a", "imagenet_r")},
    }
    if not base2new and extra_roots:
        meta["extra_roots"] = extra_roots
    return manifest, meta


def _imagenet_split(settings: PrepareSettings, split_name: str, folder: str, index: dict[str, int]) -> pd.DataFrame:
    """The rows of ImageNet's ``train`` or ``val`` folder (one sub-folder per WordNet id)."""
    rel_root = f"{get_dataset('imagenet').image_dir}/{folder}"
    if split_name == "train" and settings.listing == "filesystem":
        files = filesystem_listing(storage.join(settings.root, rel_root))
    else:
        files = storage.list_files(storage.join(settings.root, rel_root))
    rows = [(f"{rel_root}/{f}", f.split("/", 1)[0]) for f in files if "/" in f]
    unknown = sorted({w for _, w in rows if w not in index})
    if unknown:
        raise DatasetError(f"{storage.join(settings.root, rel_root)}: folders {unknown[:5]} are not ImageNet WordNet ids")
    return pd.DataFrame({
        "path": [p for p, _ in rows],
        "label": np.array([index[w] for _, w in rows], dtype=np.int64),
        "domain": "imagenet",
        "split": split_name,
    })


def _imagenet_variants(settings: PrepareSettings, index: dict[str, int], classes: int) -> dict[str, tuple[pd.DataFrame, str]]:
    """{variant: (its test rows, its root)} of the ImageNet variants found beside the dataset root (or where
    ``settings.variants`` says); a missing one is skipped with a warning. Rows are stored absolute (outside root)."""
    parent = str(PurePosixPath(settings.root).parent) if storage.is_s3(settings.root) else str(Path(settings.root).parent)
    found = {}
    for variant, folder in {**VARIANT_FOLDERS, **settings.variants}.items():
        vroot = folder if (folder.startswith("/") or storage.is_s3(folder)) else storage.join(parent, folder)
        try:
            files = storage.list_files(vroot)
        except FileNotFoundError:
            log.warning("ImageNet variant %s not found at %s: skipped (its results will be missing)", variant, vroot)
            continue
        rows = []
        for f in files:
            if "/" not in f:
                continue
            key = f.split("/", 1)[0]
            label = int(key) if variant == "imagenet_v2" else index.get(key)
            if label is None or not 0 <= label < classes:
                raise DatasetError(f"{vroot}: folder {key!r} is not an ImageNet class ({variant})")
            rows.append((f, label))
        frame = pd.DataFrame({
            "path": [storage.join(vroot, f) for f, _ in rows],
            "label": np.array([y for _, y in rows], dtype=np.int64),
            "domain": variant,
            "split": "test",
        })
        for seed in settings.seeds:
            frame[f"shots_seed{seed}"] = True
        found[variant] = (frame, vroot)
    return found


# ---------------------------------------------------------------------------------------------- entry point


def _dataset_name(settings: PrepareSettings) -> str:
    """The name results carry. A custom dataset (a layout-only kind such as ``domainbed``) must not borrow a
    registered name: the report would set the paper's numbers for that dataset beside it."""
    name = settings.name or settings.dataset
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise DatasetError(f"--name {name!r}: expected letters, digits, '_', '.' or '-' (it names result folders and tables)")
    if name != settings.dataset and name in DATASETS:
        raise DatasetError(
            f"--name {name!r} is a registered dataset with the paper's numbers: prepare it as `alignclip prepare {name} ...`,"
            " or give your data another name"
        )
    if settings.dataset in LAYOUT_KINDS and not settings.name:
        raise DatasetError(f"dataset kind {settings.dataset!r} is a folder layout: name your dataset with --name NAME")
    return name


def absolute_root(root: str) -> str:
    """Local roots are stored absolute, so a prepared dataset works from any working directory."""
    return root if storage.is_s3(root) else str(Path(root).expanduser().resolve())


def prepare(settings: PrepareSettings) -> tuple[pd.DataFrame, dict]:
    spec = get_dataset(settings.dataset)
    name = _dataset_name(settings)
    settings = replace(settings, root=absolute_root(settings.root))
    protocol = settings.protocol or default_protocol(settings.dataset)
    if protocol not in PROTOCOLS:
        raise DatasetError(f"unknown protocol {protocol!r}: expected one of {tuple(PROTOCOLS)}")
    allowed = tuple(name for name, p in PROTOCOLS.items() if spec.protocol in p.layouts)
    if protocol not in allowed:
        raise DatasetError(f"dataset {settings.dataset!r} supports protocol(s) {allowed}, not {protocol!r}")
    if not 0.0 < settings.holdout_fraction < 1.0:
        raise DatasetError(f"holdout_fraction={settings.holdout_fraction}: expected a fraction in (0, 1)")
    for field_name, value, allowed in (
        ("templates", settings.templates, TEMPLATE_CHOICES),
        ("class_names", settings.class_names, CLASS_NAME_CHOICES),
        ("listing", settings.listing, LISTINGS),
    ):
        if value not in allowed:
            raise DatasetError(f"{field_name}={value!r}: expected one of {allowed}")
    has_holdout = PROTOCOLS[protocol].held_out_domain  # the in/out split of the domains a run holds out
    if not has_holdout and (settings.trial_seed != 0 or settings.holdout_fraction != 0.2):
        # recorded nowhere and used nowhere: refuse rather than let a run look as if it had them
        raise DatasetError(
            f"trial_seed={settings.trial_seed}, holdout_fraction={settings.holdout_fraction}: the {protocol} protocol "
            f"has no in/out split (it uses the dataset's own train/val/test); they apply to domainbed and wild"
        )
    if settings.listing != "sorted" and spec.protocol != "imagenet":
        raise DatasetError(f"listing={settings.listing!r} applies to imagenet only (other layouts list in sorted order)")
    if spec.protocol == "domainbed":
        manifest, meta = prepare_domainbed(settings, wild=protocol == "wild")
    elif spec.protocol == "coop":
        manifest, meta = prepare_coop(settings)
    else:
        manifest, meta = prepare_imagenet(settings, base2new=protocol == "base2new")
    if manifest.empty:
        raise DatasetError(f"{settings.root}: no images found")
    check_rows(manifest["path"], {"root": settings.root, **meta}, settings.root)  # what load_prepared will demand
    meta.update(
        {
            "dataset": name,
            "protocol": protocol,
            "root": settings.root,
            "template": settings.template or spec.template_for(settings.templates),
            "prompts": {
                "templates": "custom" if settings.template else settings.templates,
                "class_names": settings.class_names,
            },
            "settings": used_settings(settings, protocol, spec.protocol),
            "counts": {
                "images": int(len(manifest)),
                "by_split": {k: int(v) for k, v in manifest["split"].value_counts().sort_index().items()},
                "by_domain": {k: int(v) for k, v in manifest["domain"].value_counts().sort_index().items()},
            },
        }
    )
    return manifest, meta


def used_settings(settings: PrepareSettings, protocol: str, layout: str) -> dict:
    """The protocol settings this preparation used, and no other (meta.json states only what was used)."""
    if PROTOCOLS[protocol].held_out_domain:
        # wild: the trial seed seeds CLIPood's base/open in/out split (CLIPood itself always uses 0)
        return {"holdout_fraction": settings.holdout_fraction, "trial_seed": settings.trial_seed}
    used = {"shots": settings.shots, "seeds": list(settings.seeds)}
    if layout == "imagenet":
        used["listing"] = settings.listing
    return used


def write_prepared(manifest: pd.DataFrame, meta: dict, out_dir: str | Path) -> Path:
    """Write manifest.parquet and meta.json together (both or neither; the folder may hold other things, e.g.
    the images of a pipeline's embedded dataset). A root inside the output folder is stored relative to it, so
    the prepared folder can move with its images."""
    from alignclip.publish import stage_output

    out = Path(out_dir)
    root = meta.get("root")
    if root and not storage.is_s3(root) and Path(root).is_absolute():
        try:
            meta = {**meta, "root": Path(root).relative_to(out.resolve()).as_posix() or "."}
        except ValueError:
            pass
    with stage_output(out, "prepare", owns=(artifacts.MANIFEST, artifacts.META)) as staging:
        manifest.to_parquet(staging / artifacts.MANIFEST, index=False)
        (staging / artifacts.META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_prepared(prepared_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """The manifest and metadata, checked as data (``datafiles.META``) and confined (docs/security.md):

    * a relative root (a dataset inside the prepared folder, or a meta.json written by hand) is resolved against
      the prepared folder, never against the working directory, and must stay inside it (``../elsewhere`` is
      refused); an absolute or ``s3://`` root is the choice of whoever prepared the data;
    * every manifest row must name a file below the root (no ``..`` segment) or, stored absolute, below the root
      or one of ``extra_roots`` (ImageNet's variant folders beside it); a row that leaves them is refused before
      any image is opened (``PathOutsideRoot``, naming the row). Symlinks are checked when an image is opened.
    """
    from alignclip.datafiles import META, DataFileError, check_fields, read_json

    prepared = Path(prepared_dir)
    for name in (artifacts.MANIFEST, artifacts.META):
        if not (prepared / name).is_file():
            raise FileNotFoundError(f"{prepared / name} not found: run `alignclip prepare` first")
    meta = read_json(prepared / artifacts.META, META, "the metadata of `alignclip prepare`")
    extra = meta.get("extra_roots", {})
    check_fields({"extra_roots": extra}, prepared / artifacts.META, {"extra_roots": dict})
    meta["root"] = _load_root(prepared, meta["root"], "root")
    meta["extra_roots"] = {name: _load_root(prepared, root, f"extra_roots.{name}") for name, root in extra.items()}
    try:
        manifest = pd.read_parquet(prepared / artifacts.MANIFEST)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a file that is not a parquet table
        raise DataFileError(f"{prepared / artifacts.MANIFEST}: not a readable parquet table ({type(err).__name__}: {err})") from None
    missing = [c for c in ("path", "label", "split") if c not in manifest.columns]
    if missing:
        raise DataFileError(f"{prepared / artifacts.MANIFEST}: column(s) {missing} missing")
    check_rows(manifest["path"], meta, prepared / artifacts.MANIFEST)
    return manifest, meta


def _load_root(prepared: Path, root, key: str) -> str:
    from alignclip.datafiles import DataFileError
    from alignclip.paths import PathOutsideRoot, relative_root_inside

    if not isinstance(root, str) or not root:
        raise DataFileError(f"{prepared / artifacts.META}: key {key!r} must be a non-empty string, found {root!r}")
    if storage.is_s3(root) or Path(root).is_absolute():
        return root
    if not relative_root_inside(prepared, root):
        raise PathOutsideRoot(
            f"{prepared / artifacts.META}: {key} {root!r} refused: a relative root must stay inside the prepared "
            f"folder {prepared} (write an absolute root to read images elsewhere)"
        )
    return str((prepared / root).resolve())


def allowed_roots(meta: dict) -> list[str]:
    """The roots a manifest's images may be read from: the dataset root and the ``extra_roots``."""
    return [meta["root"], *meta.get("extra_roots", {}).values()]


def check_rows(paths: pd.Series, meta: dict, source) -> None:
    """Every row below an allowed root, judged on the strings (vectorised: a 600k-row manifest in a second)."""
    from alignclip.paths import PathOutsideRoot

    paths = paths.astype(str)
    dotdot = paths.str.contains(r"(?:^|/)\.\.(?:/|$)", regex=True)
    absolute = paths.str.startswith("/") | paths.str.startswith(storage.SCHEME)
    inside = pd.Series(False, index=paths.index)
    for root in allowed_roots(meta):
        inside |= paths.str.startswith(root.rstrip("/") + "/")
    bad = dotdot | (absolute & ~inside) | (paths == "")
    if bad.any():
        first = int(bad.to_numpy().argmax())
        raise PathOutsideRoot(
            f"{source}: row {first} path {paths.iloc[first]!r} refused: it leaves the dataset root {meta['root']}"
            f"{' or its extra roots' if meta.get('extra_roots') else ''} ({int(bad.sum())} such row(s))"
        )


def image_path(meta: dict, relative: str) -> str:
    """The file a manifest row names: below the root (``paths.confined``'s rules on the name) or, stored absolute,
    below one of ``allowed_roots``; anything else is refused (``PathOutsideRoot``)."""
    from alignclip.paths import PathOutsideRoot, confined_key

    if relative.startswith("/") or storage.is_s3(relative):
        if ".." not in relative.split("/") and any(relative.startswith(r.rstrip("/") + "/") for r in allowed_roots(meta)):
            return relative
        raise PathOutsideRoot(f"manifest row {relative!r} refused: it is outside the dataset root {meta['root']}")
    return confined_key(meta["root"], relative, "manifest row")


def validate_images(manifest: pd.DataFrame, meta: dict, workers: int = 8) -> list[tuple[str, str]]:
    """Decode every image in parallel; return (path, error) for each one that cannot be read."""

    roots = [os.path.realpath(r) for r in allowed_roots(meta) if not storage.is_s3(r)]

    def check(relative: str):
        path = image_path(meta, relative)
        try:
            storage.check_inside(path, roots)
            storage.open_image(path)
            return None
        except storage.UnreadableImage as err:  # a storage error is not the image's fault: it stops prepare
            return path, str(err)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [r for r in pool.map(check, manifest["path"].tolist()) if r is not None]
