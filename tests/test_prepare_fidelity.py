"""Preparation switches against the released code and CoOp, written out here: prompt templates (appendix A.2 vs
CoOp's CUSTOM_TEMPLATES), class-name cleaning (ours vs engine.py's ``c.replace("_", " ")``), the trial seed of the
in-the-wild split, ImageNet's listing order (CoOp/Dassl), and meta.json stating only the settings used."""

import os
import random

import pytest

from alignclip import protocols
from alignclip.data.prepare import DatasetError, PrepareSettings, prepare
from alignclip.data.registry import DATASETS
from tests.test_prepare import coop_tree, dassl_fewshot, domainbed_tree, reference_split, seed_hash, write_png

# Appendix A.2, one line per dataset ("Other datasets: a photo of a [CLASS].")
PAPER_A2 = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "food101": "a photo of a {}, a type of food.",
    "ucf101": "a photo of a person doing {}.",
    "caltech101": "a photo of a {}.", "stanford_cars": "a photo of a {}.", "flowers102": "a photo of a {}.",
    "sun397": "a photo of a {}.", "imagenet": "a photo of a {}.",
    "pacs": "a photo of a {}.", "vlcs": "a photo of a {}.", "office_home": "a photo of a {}.",
    "terra_incognita": "a photo of a {}.", "domain_net": "a photo of a {}.",
}
# zhyhan/AlignCLIP converter_dassl.py:25-41 (= KaiyangZhou/CoOp trainers/zsclip.py CUSTOM_TEMPLATES), by our
# registry names; DomainBed datasets: engine.py:73 and :115, "a photo of a {}."
RELEASE = {
    "oxford_pets": "a photo of a {}, a type of pet.",  # OxfordPets
    "flowers102": "a photo of a {}, a type of flower.",  # OxfordFlowers
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",  # FGVCAircraft
    "dtd": "{} texture.",  # DescribableTextures
    "eurosat": "a centered satellite photo of {}.",  # EuroSAT
    "stanford_cars": "a photo of a {}.",  # StanfordCars
    "food101": "a photo of {}, a type of food.",  # Food101
    "sun397": "a photo of a {}.",  # SUN397
    "caltech101": "a photo of a {}.",  # Caltech101
    "ucf101": "a photo of a person doing {}.",  # UCF101
    "imagenet": "a photo of a {}.",  # ImageNet (and its variants)
    "pacs": "a photo of a {}.", "vlcs": "a photo of a {}.", "office_home": "a photo of a {}.",
    "terra_incognita": "a photo of a {}.", "domain_net": "a photo of a {}.",
}


@pytest.mark.parametrize("dataset", sorted(PAPER_A2))
def test_templates_match_appendix_a2_and_the_release(dataset):
    spec = DATASETS[dataset]
    assert spec.template_for("paper") == PAPER_A2[dataset]
    assert spec.template_for("release") == RELEASE[dataset]


def test_release_class_names_replace_only_underscores(tmp_path):
    folders = ("t-shirt", "teddy-bear", "The_Eiffel_Tower", "dog")
    root = domainbed_tree(tmp_path / "dn", classes=folders)
    _, paper = prepare(PrepareSettings("domain_net", str(root)))
    manifest, release = prepare(PrepareSettings("domain_net", str(root), class_names="release", templates="release"))
    ordered = sorted(folders)  # DomainBed's ImageFolder order
    assert release["classes"] == [c.replace("_", " ") for c in ordered]  # engine.py:123
    assert release["classes"] == ["The Eiffel Tower", "dog", "t-shirt", "teddy-bear"]
    assert paper["classes"] == ["The Eiffel Tower", "dog", "t shirt", "teddy bear"]
    assert set(manifest["class_name"]) == set(release["classes"])
    assert release["prompts"] == {"templates": "release", "class_names": "release"}
    assert paper["prompts"] == {"templates": "paper", "class_names": "paper"}


def test_flowers_template_follows_the_switch_into_meta(tmp_path):
    root, split = coop_tree(tmp_path / "flowers")
    (root / "split_zhou_OxfordPets.json").rename(root / "split_zhou_OxfordFlowers.json")
    (root / "jpg").symlink_to(root / "images", target_is_directory=True)
    _, paper = prepare(PrepareSettings("flowers102", str(root)))
    _, release = prepare(PrepareSettings("flowers102", str(root), templates="release"))
    _, custom = prepare(PrepareSettings("flowers102", str(root), template="a {} flower.", templates="release"))
    assert paper["template"] == "a photo of a {}."
    assert release["template"] == "a photo of a {}, a type of flower."
    assert custom["template"] == "a {} flower." and custom["prompts"]["templates"] == "custom"


def test_wild_split_uses_the_trial_seed_and_records_it(tmp_path):
    root = domainbed_tree(tmp_path / "oh", classes=("a1", "b2", "c3", "d4", "e5"))
    manifest, meta = prepare(PrepareSettings("office_home", str(root), protocol="wild", trial_seed=3))
    assert meta["settings"] == {"holdout_fraction": 0.2, "trial_seed": 3}
    differs = False
    for env_index, domain in enumerate(meta["domains"]):
        rows = manifest[manifest["domain"] == domain].sort_values("env_index").reset_index(drop=True)
        for name, mask in (("base", rows["label"] < 2), ("open", rows["label"] >= 2)):
            part = rows[mask].reset_index(drop=True)
            out, _ = reference_split(len(part), 0.2, seed_hash(3, env_index, name))
            assert set(part.index[part["split"] == "val"]) == out
            differs |= out != reference_split(len(part), 0.2, seed_hash(0, env_index, name))[0]
    assert differs  # trial seed 3 is not CLIPood's seed-0 split


def test_meta_states_only_the_settings_used(tmp_path):
    _, domainbed = prepare(PrepareSettings("pacs", str(domainbed_tree(tmp_path / "pacs")), shots=4, seeds=[5]))
    assert domainbed["settings"] == {"holdout_fraction": 0.2, "trial_seed": 0}  # no shots/seeds: not used
    root, _ = coop_tree(tmp_path / "oxford_pets")
    _, coop = prepare(PrepareSettings("oxford_pets", str(root), shots=4, seeds=[1, 2]))
    assert coop["settings"] == {"shots": 4, "seeds": [1, 2]}  # no trial seed / holdout: CoOp's own split
    with pytest.raises(DatasetError, match="trial_seed=2.*base2new protocol has no in/out split"):
        prepare(PrepareSettings("oxford_pets", str(root), trial_seed=2))
    with pytest.raises(DatasetError, match="listing='filesystem' applies to imagenet only"):
        prepare(PrepareSettings("oxford_pets", str(root), listing="filesystem"))
    with pytest.raises(DatasetError, match="templates='coop': expected one of"):
        prepare(PrepareSettings("oxford_pets", str(root), templates="coop"))


def imagenet_tree(base, wnids, per_class=20):
    order = random.Random(0)
    n = 0
    for wnid in wnids:
        names = [f"n_{i:03d}.JPEG" for i in range(per_class)]
        order.shuffle(names)  # creation order unlike the sorted one
        for name in names:
            write_png(base / "images" / "train" / wnid / name, n)
            n += 1
        write_png(base / "images" / "val" / wnid / "v.JPEG", n)
    return base


def coop_imagenet_fewshot(train_dir, shots, seed):
    """CoOp datasets/imagenet.py read_data (sorted class folders, Dassl listdir_nohidden: os.listdir order, hidden
    names dropped), then generate_fewshot_dataset under random.seed(seed)."""
    items = []
    for label, folder in enumerate(sorted(f.name for f in os.scandir(train_dir) if f.is_dir())):
        for name in [f for f in os.listdir(train_dir / folder) if not f.startswith(".")]:
            items.append((f"{folder}/{name}", label))
    random.seed(seed)
    return {path for path, _ in dassl_fewshot(items, shots)}


def test_imagenet_listing_sorted_or_filesystem(tmp_path):
    from alignclip.data.prepare import imagenet_classes

    wnids = imagenet_classes()[0][:3]
    base = imagenet_tree(tmp_path / "imagenet", wnids)
    train_dir = base / "images" / "train"
    variants = {"imagenet_v2": str(tmp_path / "none")}
    fs_manifest, fs_meta = prepare(
        PrepareSettings("imagenet", str(base), shots=4, seeds=[1], listing="filesystem", variants=variants, protocol="base2new")
    )
    sorted_manifest, sorted_meta = prepare(PrepareSettings("imagenet", str(base), shots=4, seeds=[1], protocol="base2new"))
    assert fs_meta["settings"]["listing"] == "filesystem" and sorted_meta["settings"]["listing"] == "sorted"

    def picks(manifest):
        train = manifest[(manifest["split"] == "train") & manifest["shots_seed1"]]
        return {p.split("images/train/", 1)[1] for p in train["path"]}

    assert picks(fs_manifest) == coop_imagenet_fewshot(train_dir, 4, 1)
    # sorted: the same procedure over sorted file names, independent of the filesystem
    items = [(f"{w}/{n}", i) for i, w in enumerate(wnids) for n in sorted(os.listdir(train_dir / w))]
    random.seed(1)
    assert picks(sorted_manifest) == {p for p, _ in dassl_fewshot(items, 4)}
    if any(os.listdir(train_dir / w) != sorted(os.listdir(train_dir / w)) for w in wnids):
        assert picks(fs_manifest) != picks(sorted_manifest)
    rows, _ = protocols.training_set(fs_manifest, fs_meta, None, seed=1)
    assert len(rows) == 3 * 4  # labels 0-2 are among the 500 base classes of the 1,000; four shots each


def test_prompt_settings_reach_prepare_from_a_params_file_and_the_command_line(tmp_path):
    import json

    from typer.testing import CliRunner

    from alignclip.cli import app

    root, _ = coop_tree(tmp_path / "food")
    (root / "split_zhou_OxfordPets.json").rename(root / "split_zhou_Food101.json")
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  templates: release\n  class_names: release\n")
    runner = CliRunner()
    done = runner.invoke(app, ["prepare", "food101", str(root), str(tmp_path / "a"), "--params-file", str(params)])
    assert done.exit_code == 0, done.output
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["template"] == "a photo of {}, a type of food." and meta["prompts"] == {"templates": "release", "class_names": "release"}
    done = runner.invoke(app, ["prepare", "food101", str(root), str(tmp_path / "b"), "--params-file", str(params), "--templates", "paper"])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["template"] == "a photo of a {}, a type of food."
