"""RotatedDigits: the embedded default dataset, built from scikit-learn's bundled handwritten digits.

Mirrors DomainBed's RotatedMNIST construction: the 1,797 real 8x8 digits are shuffled with a fixed seed and
dealt round-robin into six disjoint shards (``images[i::6]``), one per domain, and every image of shard i is
rotated by ``ANGLES[i]`` degrees. The images are upsampled and written as RGB PNGs in DomainBed's folder layout
``OUT_DIR/<domain>/<class>/<file>.png``, so the same preparation code reads it as it reads PACS or OfficeHome.
Everything is deterministic: two builds produce the same bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from alignclip.log import get_logger
from alignclip.publish import replace_folder

log = get_logger(__name__)

ANGLES = (0, 15, 30, 45, 60, 75)
CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEFAULT_SIZE = 32
SHUFFLE_SEED = 0
MARKER = ".rotated_digits.json"


def domain_name(angle: int) -> str:
    return f"rotated_{angle}"


def render_digit(pixels: np.ndarray, angle: float, size: int = DEFAULT_SIZE) -> Image.Image:
    """One 8x8 digit (values 0..16) -> an upsampled, rotated RGB image (white ink on black, like MNIST)."""
    gray = Image.fromarray(np.round(pixels.reshape(8, 8) * (255.0 / 16.0)).astype(np.uint8), mode="L")
    gray = gray.resize((size, size), Image.Resampling.BICUBIC)
    gray = gray.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
    return gray.convert("RGB")


def build_rotated_digits(out_dir: str | Path, size: int = DEFAULT_SIZE, force: bool = False) -> dict:
    """Write RotatedDigits under ``out_dir``; returns the build summary (also written to ``out_dir/.rotated_digits.json``).

    A non-empty ``out_dir`` that is not an earlier RotatedDigits build is refused unless ``force`` is set, so a
    user's folder is never overwritten silently.
    """
    from sklearn.datasets import load_digits

    out = Path(out_dir)
    if size < 8:
        raise ValueError(f"--size {size}: expected 8 pixels or more (the source digits are 8x8)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: expected a folder to build RotatedDigits into")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        if not force:
            raise FileExistsError(
                f"{out} exists, is not empty and is not a RotatedDigits build; choose an empty folder or pass --force "
                "to replace its contents"
            )
    # Built beside the target and swapped in at the end: a failed build leaves an earlier one (or the user's
    # folder) as it was, and a rebuild leaves no stale files.
    final, out = out, out.parent / f".{out.name}.digits.partial"
    shutil.rmtree(out, ignore_errors=True)
    try:
        digits = load_digits()
        images, labels = digits.images, digits.target
        order = np.random.RandomState(SHUFFLE_SEED).permutation(len(images))
        counts: dict[str, dict[str, int]] = {}
        for shard, angle in enumerate(ANGLES):
            domain = domain_name(angle)
            counts[domain] = {name: 0 for name in CLASS_NAMES}
            for index in order[shard :: len(ANGLES)]:
                name = CLASS_NAMES[labels[index]]
                target = out / domain / name / f"digit_{index:04d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                render_digit(images[index], angle, size).save(target, format="PNG", optimize=False)
                counts[domain][name] += 1
        summary = {
            "dataset": "RotatedDigits",
            "source": "sklearn.datasets.load_digits (1,797 8x8 images, 10 classes)",
            "angles": list(ANGLES),
            "domains": [domain_name(a) for a in ANGLES],
            "classes": list(CLASS_NAMES),
            "image_size": size,
            "shuffle_seed": SHUFFLE_SEED,
            "counts": counts,
            "total": int(len(images)),
        }
        (out / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    replace_folder(out, final)
    log.info("wrote RotatedDigits (%d images, %d domains) to %s", len(images), len(ANGLES), final)
    return summary
