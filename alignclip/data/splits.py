"""Split procedures of the reference protocols, reproduced index for index.

* DomainBed (``domainbed/lib/misc.py``): ``seed_hash`` and ``split_dataset``: indices 0..n-1 shuffled with
  ``np.random.RandomState(seed).shuffle``; the first ``int(holdout_fraction * n)`` are the held-out ("out")
  split, the rest the training ("in") split, with ``seed = seed_hash(trial_seed, env_index)``.
* CLIPood's in-the-wild protocol: the same procedure on the base-class and the open-class subsets of each
  environment, with ``seed_hash(0, env_index, "base")`` and ``seed_hash(0, env_index, "open")``.
* CoOp / Dassl: ``generate_fewshot_dataset`` (``random.sample`` of ``num_shots`` items per label, labels in
  order of first appearance, after ``random.seed(seed)``; validation ``min(shots, 4)`` per label drawn next) and
  ``subsample_classes`` (base = the first ``ceil(n / 2)`` sorted labels, each subset relabelled from 0).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import OrderedDict
from typing import Sequence

import numpy as np


def seed_hash(*args) -> int:
    """DomainBed's deterministic seed from any arguments: md5 of ``str(args)`` mod 2**31."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def domainbed_holdout(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(out_indices, in_indices) exactly as DomainBed's ``split_dataset(dataset, int(n * frac), seed)``."""
    keys = list(range(n))
    np.random.RandomState(seed).shuffle(keys)
    cut = int(n * holdout_fraction)
    return np.asarray(keys[:cut], dtype=np.int64), np.asarray(keys[cut:], dtype=np.int64)


def fewshot_indices(labels: Sequence[int], num_shots: int, rng: random.Random, repeat: bool = False) -> list[int]:
    """Dassl's ``generate_fewshot_dataset`` for one split, returning positions into ``labels``."""
    tracker: "OrderedDict[int, list[int]]" = OrderedDict()
    for position, label in enumerate(labels):
        tracker.setdefault(int(label), []).append(position)
    chosen: list[int] = []
    for items in tracker.values():
        if len(items) >= num_shots:
            chosen.extend(rng.sample(items, num_shots))
        elif repeat:
            chosen.extend(rng.choices(items, k=num_shots))
        else:
            chosen.extend(items)
    return chosen


def coop_fewshot(train_labels: Sequence[int], val_labels: Sequence[int], shots: int, seed: int):
    """CoOp's few-shot train and val subsets under ``seed`` (train drawn first, then val with min(shots, 4))."""
    rng = random.Random(seed)
    train = fewshot_indices(train_labels, shots, rng)
    val = fewshot_indices(val_labels, min(shots, 4), rng)
    return train, val


def coop_base_new(labels: Sequence[int]) -> tuple[list[int], list[int]]:
    """(base, new) label lists: base = first ceil(n / 2) of the sorted distinct labels."""
    distinct = sorted(set(int(y) for y in labels))
    m = math.ceil(len(distinct) / 2)
    return distinct[:m], distinct[m:]
