"""Feeding the model: one DataLoader (one worker pool) for all training domains, and the evaluation loader.

Training batches are balanced as in CLIPood: ``per_domain`` images from every training domain, concatenated in
domain order. Each domain is an endless stream of seeded permutations of its images (pass 0, pass 1, ...), read
``per_domain`` at a time, so every image of a domain is read exactly once per pass (a batch may straddle two
passes). Which images step ``s`` gets is a pure function of (seed, s), and every sample's augmentation runs under
its own RNG seed derived from (seed, s, slot in the batch): a run's batches are therefore the same for any number
of workers, and the loader's whole state is ``{"seed", "step"}`` (``state_dict``/``load_state_dict``), which a
resumed run restores to get exactly the batches it would have had.
"""

from __future__ import annotations

import bisect
import math
import os
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

AUTO = "auto"
PREFETCH_BATCHES_PER_WORKER = 4
_MASK64 = (1 << 64) - 1


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by the cgroup's CFS quota (a pod's ``resources.limits.cpu``), or None when unlimited.

    cgroup v2 keeps ``<quota> <period>`` in ``cpu.max`` (``max`` = no quota); v1 keeps ``cpu.cfs_quota_us``
    (-1 = none) and ``cpu.cfs_period_us``.
    """
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 else quota_us / period_us
    return None


def available_cpus() -> int:
    """CPUs this process may really use: its CPU affinity, capped by the cgroup quota (rounded up)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def resolve_workers(setting: int | str | None) -> int:
    """Number of DataLoader worker processes for ``--num-workers``: a count, or ``auto``.

    ``auto`` leaves one CPU to the main process (it drives the accelerator, or computes on CPU) and gives the
    rest to workers; with two CPUs or fewer it reads in the main process, since one worker then only adds
    inter-process copies (measured by bench/input_pipeline.py: see README).
    """
    if setting is None or str(setting).lower() == AUTO:
        cpus = available_cpus()
        return cpus - 1 if cpus > 2 else 0
    try:
        workers = int(setting)
    except (TypeError, ValueError):
        raise ValueError(f"num_workers: expected a count >= 0 or 'auto', got {setting!r}") from None
    if workers < 0:
        raise ValueError(f"num_workers: expected a count >= 0 or 'auto', got {setting!r}")
    return workers


def loader_options(num_workers: int, device: torch.device | str) -> dict:
    """DataLoader keyword arguments shared by training and evaluation."""
    device = torch.device(device)
    options = {"num_workers": num_workers, "pin_memory": device.type == "cuda"}
    if num_workers > 0:
        options.update(
            persistent_workers=True,
            prefetch_factor=PREFETCH_BATCHES_PER_WORKER,
            worker_init_fn=seed_worker,
        )
    return options


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs of a worker from its torch seed (base seed of the loader + worker id),
    for transforms that draw from them; torch's own RNG is already seeded per worker by the DataLoader."""
    seed = torch.initial_seed() & 0xFFFFFFFF
    random.seed(seed)
    np.random.seed(seed)


def sample_seed(seed: int, step: int, slot: int) -> int:
    """The augmentation seed of one sample: a 64-bit mix (splitmix64) of (run seed, step, slot in the batch)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + slot * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


class SeededDomains(Dataset):
    """The training domains as one dataset, indexed by ``(global index, augmentation seed)``.

    A sample is read and augmented under its own seed, so which worker process reads it does not matter.
    """

    def __init__(self, datasets: Sequence[Dataset]):
        self.datasets = list(datasets)
        self.offsets = [0]
        for dataset in self.datasets:
            self.offsets.append(self.offsets[-1] + len(dataset))

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        domain = bisect.bisect_right(self.offsets, index) - 1
        return domain, index - self.offsets[domain]

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        domain, local = self.locate(index)
        # Seeding the global RNG is the sample's business; keeping the caller's RNG intact is the reader's: a
        # worker process owns its RNG, and the main process saves and restores it once per batch (BalancedLoader),
        # not once per image (fork_rng per image cost as much as decoding it). Only the CPU generator, which the
        # transforms draw from: torch.manual_seed also queues a lazy CUDA seeding with a formatted stack trace,
        # which made seeding cost more than reading and augmenting the image.
        torch.default_generator.manual_seed(seed)
        return self.datasets[domain][local]


class BalancedBatchSampler(Sampler):
    """Batch ``s`` = ``per_domain`` keys from each domain's permutation stream, for s in [start, total_steps)."""

    def __init__(self, domain_sizes: Sequence[int], per_domain: int, seed: int, total_steps: int, start_step: int = 0):
        if not domain_sizes or min(domain_sizes) < 1:
            raise ValueError(f"every training domain needs at least one image, got sizes {list(domain_sizes)}")
        if per_domain < 1:
            raise ValueError(f"batch size per domain must be >= 1, got {per_domain}")
        self.sizes = [int(n) for n in domain_sizes]
        self.offsets = np.cumsum([0, *self.sizes[:-1]]).tolist()
        self.per_domain = int(per_domain)
        self.seed = int(seed)
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def permutation(self, domain: int, epoch: int) -> np.ndarray:
        """Order of the domain's images in pass ``epoch`` (cached: one pass is consumed over many steps)."""
        cached = self._permutations.get(domain)
        if cached is None or cached[0] != epoch:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, 1_000_003 + domain))
            cached = (epoch, torch.randperm(self.sizes[domain], generator=generator).numpy())
            self._permutations[domain] = cached
        return cached[1]

    def indices(self, step: int) -> list[int]:
        """Global dataset indices of batch ``step``, domain by domain."""
        out = []
        for domain, size in enumerate(self.sizes):
            for position in range(step * self.per_domain, (step + 1) * self.per_domain):
                epoch, offset = divmod(position, size)
                out.append(self.offsets[domain] + int(self.permutation(domain, epoch)[offset]))
        return out

    def batch(self, step: int) -> list[tuple[int, int]]:
        return [(index, sample_seed(self.seed, step, slot)) for slot, index in enumerate(self.indices(step))]

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            yield self.batch(step)


class BalancedLoader:
    """Balanced training batches (images, targets) on ``device`` from one worker pool, resumable.

    ``data_wait_s`` accumulates the time the consumer spent waiting for a batch (including the copy to the
    device being issued); ``step`` counts the batches handed out, which is what ``state_dict`` saves.
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        per_domain: int,
        seed: int,
        total_steps: int,
        num_workers: int = 0,
        device: torch.device | str = "cpu",
    ):
        self.dataset = SeededDomains(datasets)
        self.per_domain = per_domain
        self.seed = seed
        self.total_steps = total_steps
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.step = 0
        self.data_wait_s = 0.0

    def __len__(self) -> int:
        return max(0, self.total_steps - self.step)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "per_domain": self.per_domain,
                "domain_sizes": [len(d) for d in self.dataset.datasets]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the data must be the same (domain sizes, batch per domain)."""
        here = self.state_dict()
        for key in ("per_domain", "domain_sizes"):
            if state[key] != here[key]:
                raise ValueError(f"loader state: {key} {state[key]} was saved, this run has {here[key]}")
        self.seed, self.step = int(state["seed"]), int(state["step"])

    def __iter__(self):
        sampler = BalancedBatchSampler(
            [len(d) for d in self.dataset.datasets], self.per_domain, self.seed, self.total_steps, self.step
        )
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            generator=torch.Generator().manual_seed(self.seed),  # base seed of the workers' RNGs
            **loader_options(self.num_workers, self.device),
        )
        non_blocking = self.device.type == "cuda"
        batches = iter(loader)
        while True:
            tic = time.perf_counter()
            try:
                if self.num_workers:
                    images, targets, *_ = next(batches)
                else:  # read here: the samples' seeding must not move the training process's RNG
                    with torch.random.fork_rng(devices=[]):
                        images, targets, *_ = next(batches)
            except StopIteration:
                return
            images = images.to(self.device, non_blocking=non_blocking)
            targets = targets.to(self.device, non_blocking=non_blocking)
            self.data_wait_s += time.perf_counter() - tic
            self.step += 1
            yield images, targets


def evaluation_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device | str,
                      collate_fn=None) -> DataLoader:
    """In-order batches of one evaluation view, read by ``num_workers`` processes, pinned for the copy on CUDA.
    ``collate_fn``: e.g. ``images.collate_readable``, which leaves unreadable images out of a batch."""
    options = loader_options(num_workers, device)
    options.pop("persistent_workers", None)  # one pass per view: nothing to keep alive
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, **options)
