"""Torch datasets over a manifest, with CLIPood's transforms. A bad image is skipped (counted, logged), never a crash."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from alignclip.data import storage
from alignclip.data.prepare import image_path
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


class ManifestImages(Dataset):
    """Images of some manifest rows with labels remapped into a label space (a list of global class indices).

    ``skipped`` lists unreadable files met in this process; with DataLoader workers (``num_workers > 0``) each
    worker keeps its own list and only the log lines report them, so run `alignclip prepare --validate` to get
    the full list up front.
    """

    def __init__(self, meta: dict, paths: list[str], labels: list[int], label_space: list[int], transform):
        position = {g: i for i, g in enumerate(label_space)}
        outside = sorted({y for y in labels if y not in position})
        if outside:
            raise ValueError(f"labels {outside[:5]} are not in the label space of this split")
        self.paths = [image_path(meta, p) for p in paths]
        self.targets = [position[y] for y in labels]
        self.transform = transform
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.paths)

    def stage(self, cache_dir=None) -> None:
        """Read ``s3://`` images from local copies, fetched once in parallel (``storage.stage``)."""
        self.paths = storage.stage(self.paths, cache_dir)

    def __getitem__(self, index: int):
        # A file that cannot be decoded is replaced by the next readable one and reported; the run goes on.
        for attempt in range(len(self.paths)):
            i = (index + attempt) % len(self.paths)
            try:
                image = storage.open_image(self.paths[i])
            except Exception as err:  # noqa: BLE001 - any decoder error
                if self.paths[i] not in self.skipped:
                    self.skipped.append(self.paths[i])
                    log.warning("skipping unreadable image %s (%s: %s)", self.paths[i], type(err).__name__, err)
                continue
            return self.transform(image), torch.tensor(self.targets[i]), torch.tensor(i)
        raise RuntimeError("no readable image in this split")
