"""`alignclip pretrain`: the tiny preset's default weights, a small CLIP pre-trained contrastively by the project.

The paper fine-tunes a CLIP that was pre-trained on image-caption pairs; the embedded demo needs the same
starting point (zero-shot well above chance, aligned image and text features) without a download. This module
builds it, deterministically, from a source distribution that shares nothing with the demo's data:

* **Source: printed digits, upright.** Each image is a digit 0-9 typeset in one of the 21 fonts that ship inside
  matplotlib (DejaVu Sans/Sans Mono/Serif and STIX in four styles, five Computer Modern faces), with a small
  random slant (±10°), stroke weight, aspect, size and position, then passed through the preprocessing of the UCI
  handwritten digits that scikit-learn's ``load_digits`` comes from (a 32x32 bitmap, on-pixels counted in 4x4
  blocks: an 8x8 image of values 0..16), and drawn at 32 px by the same ``render_digit`` as RotatedDigits.
* **Relation to the demo's domains.** RotatedDigits holds *handwritten* digits (the 1,797 UCI images) rotated by
  0-75°; the source holds *printed* digits, upright. So zero-shot on ``rotated_0`` measures printed -> handwritten
  transfer, and every further rotation adds a shift the pre-training never saw. No RotatedDigits image (and no
  handwriting at all) is used here.
* **Captions.** "a photo of the digit three.", "a photo of the number three.", "the digit three.", "a printed
  three." and "the number 3.": the class word or numeral in a few templates, one of them the dataset's prompt.
* **Objective.** CLIP's symmetric image-text cross-entropy with a learnt temperature. With ten classes a batch
  holds many captions of one class, so every caption of an image's class counts as a positive (UniCL's
  target); the text side encodes the 10 x 5 distinct captions once per step.
* **Determinism.** CPU, fixed seeds (numpy for the source images, torch for the initialisation and the batches),
  ``torch.use_deterministic_algorithms``, one thread, and CPU kernels that are the same on every x86-64 CPU
  with AVX2 (alignclip/determinism.py: ATen's AVX2 build, MKL's AVX2 branch, no oneDNN or NNPACK; set by the CLI before
  torch loads): builds under an AVX2 and an AVX-512 host's settings give the same bytes
  (tests/test_determinism.py), and the README's sha256 is what `alignclip pretrain` builds. The weights are
  cached under ``$ALIGNCLIP_CACHE/pretrained`` with a name that carries a digest of this module, the settings,
  the library versions and the CPU kernels, so any change builds a new file instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from alignclip.log import get_logger
from alignclip.publish import publish_files, stage_output

log = get_logger(__name__)

SOURCE = "alignclip:digits"  # the tiny preset's default `pretrained` value
BUILDER_VARIABLE = "ALIGNCLIP_PRETRAIN_BUILDER"  # set in the process cached_weights starts to build the weights
WEIGHTS_NAME = "alignclip-tiny-digits"
ARCHITECTURE = "alignclip-tiny"
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf",
)
CAPTIONS = ("a photo of the digit {word}.", "a photo of the number {word}.", "the digit {word}.", "a printed {word}.",
            "the number {numeral}.")


@dataclass(frozen=True)
class PretrainSettings:
    variants: int = 24  # images per (font, digit) in the training set
    val_variants: int = 4  # images per (font, digit) in the source validation set (own seed)
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    seed: int = 0
    threads: int = 1  # fixed while building: float reductions depend on how work is split over threads


# ------------------------------------------------------------------------------------------------ source images


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def printed_digit(font, digit: int, rng: np.random.RandomState) -> np.ndarray:
    """One printed digit through the UCI preprocessing: an 8x8 array of on-pixel counts (0..16) per 4x4 block."""
    from PIL import Image, ImageDraw, ImageFilter

    canvas = Image.new("L", (96, 96), 0)
    ImageDraw.Draw(canvas).text((24, 8), str(digit), font=font, fill=255)
    canvas = canvas.rotate(float(rng.uniform(-10, 10)), resample=Image.Resampling.BILINEAR)
    weight = int(rng.randint(0, 4))  # 0..3: dilate the strokes (handwriting in the UCI set is heavy)
    if weight:
        canvas = canvas.filter(ImageFilter.MaxFilter(2 * weight + 1))
    glyph = canvas.crop(canvas.getbbox())
    width, height = glyph.size
    # UCI normalised each digit to its 32x32 box: scale the taller side to fill it, stretch the width a little
    scale = 32.0 / max(width, height) * float(rng.uniform(0.85, 1.0))
    new_w = int(min(32, max(1, round(width * scale * float(rng.uniform(0.8, 1.6))))))
    new_h = int(min(32, max(1, round(height * scale))))
    glyph = glyph.resize((new_w, new_h), Image.Resampling.BILINEAR)
    box = Image.new("L", (32, 32), 0)
    # centred as UCI's, give or take two pixels
    left = min(32 - new_w, max(0, (32 - new_w) // 2 + int(rng.randint(-2, 3))))
    top = min(32 - new_h, max(0, (32 - new_h) // 2 + int(rng.randint(-2, 3))))
    box.paste(glyph, (left, top))
    bits = (np.asarray(box) >= 128).astype(np.int64)
    return bits.reshape(8, 4, 8, 4).sum(axis=(1, 3))


def source_images(variants: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The printed-digit source set: uint8 RGB images [N, size, size, 3] and labels [N], deterministic in ``seed``."""
    from PIL import ImageFont

    from alignclip.data.digits import render_digit

    rng = np.random.RandomState(seed)
    fonts = [ImageFont.truetype(str(_font_dir() / name), 64) for name in FONTS]
    images, labels = [], []
    for _ in range(variants):
        for font in fonts:
            for digit in range(10):
                pixels = printed_digit(font, digit, rng)
                images.append(np.asarray(render_digit(pixels, 0.0, size)))
                labels.append(digit)
    return np.stack(images), np.asarray(labels)


def captions() -> list[list[str]]:
    """Caption variants per class (class index -> list of captions)."""
    from alignclip.data.digits import CLASS_NAMES

    return [[c.format(word=word, numeral=i) for c in CAPTIONS] for i, word in enumerate(CLASS_NAMES)]


# ------------------------------------------------------------------------------------------------ training


def _normalise(images: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def contrastive_loss(image_features, text_features, image_labels, text_labels, logit_scale) -> torch.Tensor:
    """Symmetric CLIP cross-entropy where every caption of an image's class is a positive (and vice versa)."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale * image_features @ text_features.T  # [B, T]
    match = (image_labels[:, None] == text_labels[None, :]).float()
    image_to_text = -(match / match.sum(1, keepdim=True) * logits.log_softmax(dim=1)).sum(1).mean()
    present = match.sum(0) > 0  # captions whose class is in the batch
    column = match[:, present]
    text_to_image = -(column / column.sum(0, keepdim=True) * logits[:, present].log_softmax(dim=0)).sum(0).mean()
    return 0.5 * (image_to_text + text_to_image)


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images: torch.Tensor, labels: torch.Tensor, template: str) -> float:
    """Top-1 accuracy (%) of the class prompts ``template`` against ``images``."""
    from alignclip.data.digits import CLASS_NAMES

    text = F.normalize(model.encode_text(tokenizer([template.format(n) for n in CLASS_NAMES])).float(), dim=-1)
    correct = 0
    for chunk, target in zip(images.split(512), labels.split(512)):
        features = F.normalize(model.encode_image(chunk).float(), dim=-1)
        correct += int(((features @ text.T).argmax(1) == target).sum())
    return 100.0 * correct / len(labels)


def build(out_path: str | Path, settings: PretrainSettings = PretrainSettings(), log_path: str | Path | None = None) -> dict:
    """Pre-train the tiny CLIP on the printed-digit source and write its state dict to ``out_path``.

    Returns the build summary (settings, source sizes, losses, source-validation zero-shot accuracy, sha256).
    """
    from alignclip import determinism

    threads, mkldnn, nnpack = torch.get_num_threads(), torch.backends.mkldnn.enabled, torch._C._get_nnpack_enabled()
    precision = torch.get_float32_matmul_precision()
    deterministic = torch.are_deterministic_algorithms_enabled()
    determinism.configure_torch("cpu")  # portable kernels (the same bytes on any x86-64 CPU with AVX2), deterministic
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            summary = _train(out_path, settings, log_path)
        summary["cpu"] = {**determinism.state(), "model": determinism.cpu_model()}
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.mkldnn.enabled = mkldnn
        torch.backends.nnpack.set_flags(nnpack)
        torch.set_float32_matmul_precision(precision)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary


def _train(out_path, settings: PretrainSettings, log_path) -> dict:
    from alignclip.clip_factory import build_clip

    bundle = build_clip(ARCHITECTURE, None, "none")  # random weights drawn under the factory's fixed seed
    model, tokenizer = bundle.model, bundle.tokenizer
    images, labels = source_images(settings.variants, settings.seed, bundle.image_size)
    val_images, val_labels = source_images(settings.val_variants, settings.seed + 1, bundle.image_size)
    x = _normalise(images, bundle.mean, bundle.std)
    y = torch.from_numpy(labels)
    val_x, val_y = _normalise(val_images, bundle.mean, bundle.std), torch.from_numpy(val_labels)
    per_class = captions()
    caption_tokens = tokenizer([c for group in per_class for c in group])
    caption_labels = torch.arange(len(per_class)).repeat_interleave(len(per_class[0]))
    optimizer = _optimizer(model, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    rows = []
    for step in range(settings.steps):
        lr = warmup_cosine_lr(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(y), (settings.batch_size,), generator=generator)
        loss = contrastive_loss(
            model.encode_image(x[index]), model.encode_text(caption_tokens), y[index], caption_labels,
            model.logit_scale.exp().clamp(max=100.0),
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        rows.append((step + 1, loss.item(), lr))
        if (step + 1) % 100 == 0 or step + 1 == settings.steps:
            log.info("pretrain step %d/%d loss=%.4f", step + 1, settings.steps, rows[-1][1])
    model.eval()
    template = "a photo of the digit {}."
    accuracy = zero_shot_accuracy(model, tokenizer, val_x, val_y, template)
    out_path = _save_weights(model, out_path)
    if log_path is not None:
        Path(log_path).write_text("step,loss,lr\n" + "".join(f"{s},{loss:.6g},{lr:.6g}\n" for s, loss, lr in rows))
    return _build_summary(out_path, settings, len(y), len(val_y), per_class, rows, accuracy, template)


def _optimizer(model: torch.nn.Module, settings: PretrainSettings) -> torch.optim.AdamW:
    """AdamW over the whole CLIP but its token embedding; biases, norms and embeddings without weight decay.

    The token embedding (49,408 x 64) keeps its seeded initialisation: the text transformer learns on top of
    it, and the optimiser does not rewrite 3M unused rows each step."""
    model.token_embedding.weight.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )


def warmup_cosine_lr(step: int, settings: PretrainSettings) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay towards 0 at ``steps`` (``step`` counts from 0)."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.5 * settings.lr * (1.0 + math.cos(math.pi * progress))


def _save_weights(model: torch.nn.Module, out_path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Through a buffer: torch.save names its zip records after the file, so a direct save would make the bytes
    # depend on the file name.
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    out_path.write_bytes(buffer.getvalue())
    return out_path


def _build_summary(out_path: Path, settings: PretrainSettings, train_images: int, val_images: int, per_class: list,
                   rows: list, accuracy: float, template: str) -> dict:
    return {
        "weights": out_path.name,
        "sha256": _sha256(out_path),
        "architecture": ARCHITECTURE,
        "settings": asdict(settings),
        "source": {
            "kind": "printed digits (matplotlib's bundled fonts), upright (±10° slant), UCI 8x8 preprocessing",
            "fonts": list(FONTS),
            "train_images": int(train_images),
            "val_images": int(val_images),
            "captions": per_class[3],
        },
        "final_loss": round(rows[-1][1], 4) if rows else None,
        "source_val_zero_shot_acc": round(accuracy, 2),
        "source_val_template": template,
        "digest": settings_digest(settings),
        "torch": torch.__version__,
    }


# ------------------------------------------------------------------------------------------------ the artefact


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def settings_digest(settings: PretrainSettings = PretrainSettings()) -> str:
    """Digest of what determines the weights' bytes: this module, the renderer, the model config, the settings,
    the library versions and the CPU kernels that build them (``build_kernels()``). It names the cached
    file, so a change builds a new one."""
    import open_clip
    import PIL

    from alignclip import clip_factory
    from alignclip.data import digits

    parts = [
        Path(__file__).read_bytes(),
        Path(digits.__file__).read_bytes(),
        (clip_factory.RESOURCES / "model_configs" / f"{ARCHITECTURE}.json").read_bytes(),
        json.dumps(asdict(settings), sort_keys=True).encode(),
        f"{torch.__version__} {open_clip.__version__} {PIL.__version__} {np.__version__}".encode(),
        json.dumps(build_kernels(), sort_keys=True).encode(),  # portable or, in native mode, the host's kernels
    ]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


def build_kernels() -> dict:
    """The kernels the weights are built with, as ``determinism.kernels()`` reports them in the building process:
    the portable ones of this CPU's level, whatever kernels the asking process runs. A GPU run is not pinned
    (alignclip.determinism), yet must load the bytes the pipeline's CPU tasks (similarity, report) load. In
    native mode (ALIGNCLIP_CPU_KERNELS=native): this process's own."""
    from alignclip import determinism

    if determinism.mode() == "native":
        return determinism.kernels()
    environment = determinism.portable_environment()
    return {"cpu_kernels": "portable", "aten_cpu_capability": determinism.CAPABILITY_NAMES[environment["ATEN_CPU_CAPABILITY"]],
            "mkl_cbwr": environment["MKL_CBWR"], "mkldnn": False, "nnpack": False}


def shipped_dirs() -> list[Path]:
    """Read-only folders that hold built weights under their cache names, searched before the cache:
    ``ALIGNCLIP_WEIGHTS_PATH`` (os.pathsep-separated). The image sets it to the weights built into it, so that no
    task pod pre-trains (each pod's cache starts empty) and every task of a pipeline loads the same bytes."""
    return [Path(p) for p in os.environ.get("ALIGNCLIP_WEIGHTS_PATH", "").split(os.pathsep) if p]


def cache_dir() -> Path:
    from alignclip.storage import cache_root

    return cache_root() / "pretrained"


def cached_weights(settings: PretrainSettings = PretrainSettings(), rebuild: bool = False) -> Path:
    """Path of the pre-trained tiny weights: shipped (``shipped_dirs``), else in the cache, built first if missing
    (about a minute on 2 cores)."""
    name = f"{WEIGHTS_NAME}-{settings_digest(settings)}.pt"
    for folder in [] if rebuild else [*shipped_dirs(), cache_dir()]:  # weights and summary both present: a hit
        if (folder / name).is_file() and (folder / name).with_suffix(".json").is_file():
            return folder / name
    target = cache_dir() / name
    target.parent.mkdir(parents=True, exist_ok=True)
    from alignclip import determinism

    if determinism.kernels() != build_kernels():
        if settings != PretrainSettings() or os.environ.get(BUILDER_VARIABLE):
            raise RuntimeError(f"the tiny weights must be built with the kernels {build_kernels()}, this process runs "
                               f"{determinism.kernels()}: call alignclip.determinism.pin_process() before torch is imported")
        # This process computes with other kernels (a GPU run, or torch loaded before the CLI could pin them): the
        # CLI builds them, pinned, in a process of its own (marked, so that it never starts another), into this cache.
        log.info("building the tiny preset's pre-trained weights with the portable kernels in a new process")
        env = {k: v for k, v in os.environ.items() if k not in determinism.PORTABLE_ENVIRONMENT} | {BUILDER_VARIABLE: "1"}
        with tempfile.TemporaryDirectory() as scratch:
            done = subprocess.run([sys.executable, "-m", "alignclip", "pretrain", scratch, *(["--rebuild"] if rebuild else [])],
                                  env=env, capture_output=True, text=True)
        if done.returncode or not target.is_file():
            raise RuntimeError(f"`alignclip pretrain` did not build {target}: "
                               + (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1])
        return target
    log.info("building the tiny preset's pre-trained weights (once; cached as %s)", target)
    # Build beside the target and rename: a concurrent reader never sees a half-written file; the weights last,
    # so that a cache hit (weights and summary present) finds the log and summary that go with them.
    log_file, summary_file = target.with_suffix(".csv").name, target.with_suffix(".json").name
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        summary = build(Path(scratch) / target.name, settings, log_path=Path(scratch) / log_file)
        summary["weights"] = target.name
        Path(scratch, summary_file).write_text(json.dumps(summary, indent=2) + "\n")
        publish_files(scratch, target.parent, (log_file, summary_file, target.name))
    return target


def export(out_dir: str | Path, settings: PretrainSettings = PretrainSettings(), rebuild: bool = False) -> dict:
    """Copy the (cached or freshly built) weights, their summary and training log into ``out_dir``."""
    weights = cached_weights(settings, rebuild)
    names = (f"{WEIGHTS_NAME}.pt", "pretrain_log.csv", f"{WEIGHTS_NAME}.json")
    # out_dir may hold the user's other files: only these three are replaced, together, once checked
    with stage_output(out_dir, "pretrain", owns=names) as staging:
        shutil.copyfile(weights, staging / names[0])
        shutil.copyfile(weights.with_suffix(".csv"), staging / names[1])
        summary = json.loads(weights.with_suffix(".json").read_text())
        summary["weights"] = names[0]
        summary["cached_as"] = str(weights)
        (staging / names[2]).write_text(json.dumps(summary, indent=2) + "\n")
        if _sha256(staging / names[0]) != summary["sha256"]:
            raise RuntimeError(f"{weights} does not match the sha256 in its summary: delete it and run `alignclip pretrain` again")
    return summary
