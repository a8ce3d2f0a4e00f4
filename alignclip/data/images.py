"""Torch datasets over a manifest, with CLIPood's transforms. A bad image is skipped (counted, logged), never a crash."""

from __future__ import annotations

import os
import time

import torch
from torch.utils.data import Dataset, default_collate
from torchvision import transforms as T

from alignclip import storage
from alignclip.data.prepare import allowed_roots, image_path
from alignclip.log import get_logger

log = get_logger(__name__)


def train_transform(size: int, mean, std, hflip: bool = True, scale=(0.7, 1.0)):
    """CLIPood's training augmentation: RandomResizedCrop(scale 0.7-1) + horizontal flip + CLIP normalisation."""
    steps = [T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(size: int, mean, std):
    """Resize(size) + CenterCrop(size) + CLIP normalisation."""
    return T.Compose(
        [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)]
    )


# Decoded images shared by every ManifestImages of this process and of the processes forked from it, by file path
# (``preload``): `alignclip grid` fills it before forking its workers, so the dozens of cells of a stage, each with
# its training and evaluation datasets over the same small dataset, decode each image once instead of per dataset.
_SHARED: dict[str, object] = {}


def image_bytes(image) -> int:
    """Memory of a decoded image (the budget of ``keep_decoded_bytes`` and ``preload``)."""
    return image.width * image.height * len(image.getbands())


def preload(meta: dict, paths: list[str], max_bytes: int) -> int:
    """Decode the local images of manifest rows ``paths`` into the shared in-memory copies, until ``max_bytes`` of
    decoded images are held; returns how many are held. Each is checked as a dataset reads it (below the dataset's
    roots, symlinks resolved); an image that does not decode is left out, so the dataset that reads it reports it
    as before. ``s3://`` rows are left to ``ManifestImages.stage``."""
    roots = [os.path.realpath(r) for r in allowed_roots(meta) if not storage.is_s3(r)]
    held = sum(image_bytes(image) for image in _SHARED.values())
    for relative in paths:
        path = image_path(meta, relative)
        if path in _SHARED or storage.is_s3(path):
            continue
        try:
            storage.check_inside(path, roots)
            image = storage.open_image(path)
        except (storage.UnreadableImage, storage.StorageError):
            continue
        if held + image_bytes(image) > max_bytes:
            break
        _SHARED[path] = image
        held += image_bytes(image)
    return len(_SHARED)


def clear_preloaded() -> None:
    _SHARED.clear()


class ManifestImages(Dataset):
    """Images of some manifest rows with labels remapped into a label space (a list of global class indices).

    Only bytes that do not decode make an image unreadable (``storage.UnreadableImage``). With
    ``skip_unreadable`` (evaluation) such an item is ``None``, which ``collate_readable`` leaves out of the batch:
    the image is counted as unreadable, never replaced. Otherwise (training) it is replaced by the next readable
    one of the split and listed in ``skipped``. Storage errors (endpoint down, credentials, missing bucket or
    file) are not image errors: transient ones are retried with back-off for up to ``ALIGNCLIP_STORAGE_RETRY_S``
    seconds (default 120), then, like the others, they stop the stage (``storage.StorageError``).

    ``skipped`` lists unreadable files met in this process; with DataLoader workers (``num_workers > 0``) each
    worker keeps its own list and only the log lines report them, so run `alignclip prepare --validate` to get
    the full list up front.
    """

    def __init__(self, meta: dict, paths: list[str], labels: list[int], label_space: list[int], transform,
                 skip_unreadable: bool = False):
        position = {g: i for i, g in enumerate(label_space)}
        outside = sorted({y for y in labels if y not in position})
        if outside:
            raise ValueError(f"labels {outside[:5]} are not in the label space of this split")
        self.paths = [image_path(meta, p) for p in paths]  # a row outside the roots is refused here, unopened
        # local images are read only from below these (symlinks resolved when an image is opened)
        self.roots = [os.path.realpath(r) for r in allowed_roots(meta) if not storage.is_s3(r)]
        self.targets = [position[y] for y in labels]
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        self.skipped: list[str] = []
        # decoded images kept in memory up to this many bytes (0: none); for small data read in the main process
        # (the embedded digits: decoding each image again at every step was a third of a step's time)
        self.keep_decoded_bytes = 0
        self._decoded: dict[int, object] = {}
        self._decoded_bytes = 0

    def __len__(self) -> int:
        return len(self.paths)

    def stage(self, cache_dir=None) -> None:
        """Read ``s3://`` images from local copies, fetched once in parallel (``storage.stage``)."""
        self.paths = storage.stage(self.paths, cache_dir)
        self.roots.append(os.path.realpath(storage.cache_root(cache_dir) / "s3"))

    def _open(self, i: int):
        """Fetch and decode one image, or take it from the in-memory copies: this dataset's own
        (``keep_decoded_bytes``) or the process's shared ones (``preload``), checked against this dataset's roots."""
        image = self._decoded.get(i)
        if image is None:
            image = _SHARED.get(self.paths[i])
            if image is not None:
                storage.check_inside(self.paths[i], self.roots)  # as _fetch: a symlink out of the dataset is refused
                self._decoded[i] = image  # no extra memory: the shared copy
                return image
            image = self._fetch(i)
            size = image_bytes(image)
            if self._decoded_bytes + size <= self.keep_decoded_bytes:
                self._decoded[i] = image
                self._decoded_bytes += size
        return image

    def _fetch(self, i: int):
        """Fetch and decode one image, retrying transient storage errors with exponential back-off."""
        retry_s = float(os.environ.get("ALIGNCLIP_STORAGE_RETRY_S", "120"))
        deadline, delay = None, 0.5
        while True:
            try:
                storage.check_inside(self.paths[i], self.roots)  # a symlink out of the dataset: unreadable, not opened
                return storage.open_image(self.paths[i])
            except storage.StorageError as err:
                if not err.transient:
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + retry_s
                    log.warning("%s; retrying for up to %.0fs", err, retry_s)
                if now >= deadline:
                    raise storage.StorageError(f"{err}; still failing after {retry_s:.0f}s of retries") from None
                time.sleep(min(delay, max(0.0, deadline - now)))
                delay = min(delay * 2, 10.0)

    def _unreadable(self, i: int, err: Exception) -> None:
        if self.paths[i] not in self.skipped:
            self.skipped.append(self.paths[i])
            log.warning("unreadable image %s (%s)", self.paths[i], err)

    def __getitem__(self, index: int):
        if self.skip_unreadable:
            try:
                image = self._open(index)
            except storage.UnreadableImage as err:
                self._unreadable(index, err)
                return None
            return self.transform(image), torch.tensor(self.targets[index]), torch.tensor(index)
        # Training: an image that does not decode is replaced by the next readable one and reported.
        for attempt in range(len(self.paths)):
            i = (index + attempt) % len(self.paths)
            try:
                image = self._open(i)
            except storage.UnreadableImage as err:
                self._unreadable(i, err)
                continue
            return self.transform(image), torch.tensor(self.targets[i]), torch.tensor(i)
        raise RuntimeError("no readable image in this split")


def collate_readable(items):
    """Batch the readable items (``None`` marks an unreadable image); ``None`` if none of them is."""
    items = [item for item in items if item is not None]
    return default_collate(items) if items else None
