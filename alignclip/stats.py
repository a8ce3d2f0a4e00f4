"""Paired bootstrap intervals of accuracy differences between two methods on the same test images.

A method's accuracy on a held-out domain is the mean over its seeds; its difference to a baseline (ERM, zero-shot)
is the difference of those means on the images both were scored on. Its uncertainty comes from the test sample:
the images are resampled with replacement, with ONE set of resampling indices per domain that both methods and all
their seeds share (so the pairing is kept: an image that both get right or both get wrong adds nothing), and the
interval is the 2.5th and 97.5th percentile of the resampled differences. The average over held-out domains
resamples within each domain (each with that domain's own indices) and averages the per-domain differences, as
table 1's "Avg" averages the per-domain accuracies.

The resampling indices depend only on the bootstrap seed, the column's name (dataset and domain) and the number of
images, never on the methods compared: every method's interval against ERM on a domain uses the same resamples.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SEED = 19
BOOTSTRAP_RESAMPLES = 2000
LEVEL = 0.95
_BLOCK_ENTRIES = 4_000_000  # resampled indices drawn at a time (32 MB of int64), so a large domain needs no more


@dataclass(frozen=True)
class Difference:
    """A difference of accuracies in percentage points, with its paired bootstrap interval."""

    diff: float
    low: float
    high: float
    images: int  # test images in the comparison (per domain; summed over domains for the average)

    @property
    def significant(self) -> bool:
        """False when the interval contains 0: the data do not tell the two methods apart."""
        return not (self.low <= 0.0 <= self.high)


def _generator(key: str) -> np.random.Generator:
    return np.random.default_rng([BOOTSTRAP_SEED, zlib.crc32(key.encode("utf-8"))])


def resample_indices(key: str, images: int, resamples: int = BOOTSTRAP_RESAMPLES) -> Iterator[np.ndarray]:
    """Blocks of resampling indices (rows: resamples, columns: ``images`` indices in [0, images)), in order; the
    same for every caller that names the same ``key`` and image count."""
    rng = _generator(f"{key}\0{images}")
    per_block = max(1, _BLOCK_ENTRIES // max(images, 1))
    for start in range(0, resamples, per_block):
        yield rng.integers(0, images, size=(min(per_block, resamples - start), images))


def bootstrap_means(values: np.ndarray, key: str, resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """The mean of ``values`` (one per image) over each resample of the images: shape (resamples,)."""
    values = np.asarray(values, dtype=np.float64)
    return np.concatenate([values[block].mean(axis=1) for block in resample_indices(key, len(values), resamples)])


def _per_image_difference(method: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Per image: the method's mean correctness over its seeds minus the baseline's (rows: seeds, columns: images)."""
    method, baseline = np.atleast_2d(method).astype(np.float64), np.atleast_2d(baseline).astype(np.float64)
    if method.shape[1] != baseline.shape[1] or method.shape[1] == 0:
        raise ValueError(f"paired comparison needs the same images: {method.shape[1]} and {baseline.shape[1]} columns")
    # the mean over seeds of a resample's accuracy is the resample's mean of this per-image mean (it is linear)
    return method.mean(axis=0) - baseline.mean(axis=0)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    tail = 100.0 * (1.0 - LEVEL) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def paired_difference(method: np.ndarray, baseline: np.ndarray, key: str) -> Difference:
    """Accuracy difference (points) of ``method`` to ``baseline``: 0/1 correctness arrays of shape (seeds, images),
    columns the same images in the same order. A deterministic baseline (zero-shot) is one row, reused for every
    seed. ``key`` names the column (e.g. ``dataset/domain``) and so chooses its resampling indices."""
    per_image = _per_image_difference(method, baseline)
    samples = 100.0 * bootstrap_means(per_image, key)
    low, high = _interval(samples)
    return Difference(100.0 * float(per_image.mean()), low, high, len(per_image))


def averaged_difference(pairs: dict[str, tuple[np.ndarray, np.ndarray]]) -> Difference:
    """The average over domains of the per-domain differences, ``pairs``: key -> (method, baseline) as in
    ``paired_difference``; every domain is resampled within itself, with its own key's indices."""
    if not pairs:
        raise ValueError("no domains to average")
    diffs, samples, images = [], [], 0
    for key, (method, baseline) in pairs.items():
        per_image = _per_image_difference(method, baseline)
        diffs.append(per_image.mean())
        samples.append(bootstrap_means(per_image, key))
        images += len(per_image)
    low, high = _interval(100.0 * np.mean(samples, axis=0))
    return Difference(100.0 * float(np.mean(diffs)), low, high, images)


def format_difference(difference: Difference | None) -> str:
    """``+5.0 [+1.2, +8.9]``; ``+1.0 [-2.1, +4.0] n.s.`` when the interval contains 0; a dash when there is none."""
    if difference is None:
        return "—"
    text = f"{difference.diff:+.1f} [{difference.low:+.1f}, {difference.high:+.1f}]"
    return text if difference.significant else text + " n.s."


NOT_SIGNIFICANT_NOTE = ("n.s.: the 95% interval contains 0, so this test set does not tell the two apart. Intervals: "
                        f"paired bootstrap over the test images ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}; "
                        "the same resampled images for both methods and all seeds; Avg resamples within each domain).")
