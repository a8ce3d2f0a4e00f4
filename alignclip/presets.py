"""Model presets: which open_clip architecture and weights a run uses, and how those weights are found.

A preset is data, as in open_clip: an architecture name plus a default ``pretrained`` source. The source can be
- an open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``...), downloaded by open_clip on first use;
- a local checkpoint file (``/models/ViT-B-16.pt``), the usual way on an offline cluster;
- an ``s3://bucket/key`` URI, fetched once with boto3 into a local cache (``ALIGNCLIP_CACHE``);
- ``alignclip:digits``: the ``tiny`` preset's default, a small ViT CLIP pre-trained contrastively by the project
  on printed digits (alignclip/pretrain.py), built deterministically on first use and cached;
- ``none`` for random weights (seeded).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from alignclip import s3
from alignclip.config import DEFAULTS
from alignclip.log import get_logger

log = get_logger(__name__)

RESOURCES = Path(__file__).parent / "resources"
RANDOM_INIT_SEED = 0
_TINY_REGISTERED = False


@dataclass(frozen=True)
class Preset:
    architecture: str  # an open_clip model config name
    pretrained: str | None  # default weights source (tag, path, s3:// URI) or None for random weights
    description: str


PRESETS: dict[str, Preset] = {
    "tiny": Preset("alignclip-tiny", "alignclip:digits", "6-block ViT (width 64, 4 heads, 32px, patch 8), pre-trained by "
                   "`alignclip pretrain` on printed digits; CPU tests/demo"),
    "vit-b-16": Preset("ViT-B-16", "openai", "the paper's backbone: OpenAI CLIP ViT-B/16"),
    "vit-b-32": Preset("ViT-B-32", "openai", "OpenAI CLIP ViT-B/32 (appendix B.3 backbones)"),
    "vit-l-14": Preset("ViT-L-14", "openai", "OpenAI CLIP ViT-L/14"),
    "rn50": Preset("RN50", "openai", "OpenAI CLIP-RN50 (paper fig. 5): ResNet-50 trunk, attention-pool head"),
    "tiny-rn50": Preset("alignclip-tiny-rn50", None, "CLIP-RN50-shaped ResNet (96px, attention pool), random weights; CPU tests"),
    "tiny-vit-b-32": Preset("alignclip-tiny-vit-b-32", None, "ViT with B/32's 32px patches (128px, 4 blocks), random weights; CPU tests"),
}


@dataclass
class CLIPBundle:
    """A loaded CLIP model with what the pipeline needs around it."""

    model: torch.nn.Module  # open_clip CLIP: .visual, .encode_text, .encode_image
    tokenizer: Callable
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    architecture: str
    pretrained: str | None
    # the loaded model's pre-trained softmax temperature, 1 / exp(logit_scale): 0.01 for OpenAI's CLIPs (scale 100),
    # about 0.073 for the tiny preset's digits pre-training; eq. 1 and eq. 4 use it unless a method fixes a value
    tau: float


def pretrained_tau(model: torch.nn.Module) -> float:
    """1 / exp(logit_scale) of an open_clip CLIP: the temperature its contrastive pre-training learned."""
    scale = getattr(model, "logit_scale", None)
    if not isinstance(scale, torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no logit_scale: cannot read its pre-trained temperature; "
                         "fix tau with --set tau=VALUE (and aal_tau)")
    return float(1.0 / scale.detach().float().exp().item())


def _register_tiny() -> None:
    global _TINY_REGISTERED
    if not _TINY_REGISTERED:
        import open_clip

        open_clip.add_model_config(RESOURCES / "model_configs")
        _TINY_REGISTERED = True


def resolve_weights(pretrained: str | None) -> str | None:
    """Turn a weights source into what open_clip accepts: a tag, a local file path, or None."""
    if pretrained is None or str(pretrained).lower() in ("", "none", "random"):
        return None
    source = str(pretrained)
    if source.startswith("alignclip:"):
        from alignclip import pretrain

        if source != pretrain.SOURCE:
            raise ValueError(f"unknown project weights {source!r}: expected {pretrain.SOURCE!r}")
        return str(pretrain.cached_weights())
    if s3.is_s3(source):
        return str(s3.fetch_object(source))
    looks_like_path = os.sep in source or source.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path and not Path(source).is_file():
        raise FileNotFoundError(f"checkpoint file not found: {source} (model.pretrained)")
    return source


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def _quiet_random_init(asked: bool):
    """Random weights that were asked for (`pretrained: none`, the pretrain stage) are no cause for open_clip's
    root-logger WARNING; our own INFO line says `weights: random`."""
    if not asked:
        yield
        return
    quiet = _NoRandomInitWarning()
    root = logging.getLogger()  # open_clip calls logging.warning: the record starts (and is filtered) at the root
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def check_model(name: str) -> str:
    """The open_clip architecture of a preset or architecture name; an unknown one is a ValueError (nothing loaded)."""
    import open_clip

    _register_tiny()
    preset = PRESETS.get(name.lower())
    architecture = preset.architecture if preset else name
    if architecture not in open_clip.list_models():
        raise ValueError(
            f"unknown model {name!r}: expected a preset ({', '.join(PRESETS)}) or an open_clip architecture name"
        )
    return architecture


def load_clip(name: str = DEFAULTS["model_name"], pretrained: str | None = DEFAULTS["model_pretrained"], device: str | torch.device = "cpu") -> CLIPBundle:
    """Build a CLIP model from a preset name (``tiny``, ``vit-b-16``...) or any open_clip architecture name.

    ``pretrained="default"`` takes the preset's own source; pass a tag, a file path, an ``s3://`` URI or ``none``
    to override it.
    """
    import open_clip

    preset = PRESETS.get(name.lower())
    architecture = check_model(name)
    if pretrained == "default":
        pretrained = preset.pretrained if preset else None
    weights = resolve_weights(pretrained)
    try:
        # Random weights are drawn under a fixed seed (scoped: the caller's RNG is untouched), so every stage
        # (similarity, train, evaluate, report) builds the same model, including its frozen text tower.
        with torch.random.fork_rng(devices=[]), _quiet_random_init(weights is None):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(architecture, pretrained=weights, device=device)
    except (pickle.UnpicklingError, EOFError) as err:
        # open_clip reads checkpoint files with weights_only=True: a pickle with code in it ends here.
        raise ValueError(f"{weights}: refused or unreadable weights file for {architecture} ({str(err).splitlines()[0]})") from None
    except RuntimeError as err:
        if weights is not None and not Path(weights).is_file():
            raise RuntimeError(
                f"could not load pretrained weights {weights!r} for {architecture}: {err}\n"
                "This machine may be offline. Provide the weights without the hub: download the checkpoint "
                "elsewhere and pass its file path (model.pretrained: /path/to/checkpoint.pt), upload it and pass "
                "s3://bucket/key, or pre-fill the Hugging Face cache (HF_HOME) and set HF_HUB_OFFLINE=1."
            ) from err
        raise
    model.eval()
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    tokenizer = open_clip.get_tokenizer(architecture)
    tau = pretrained_tau(model)
    log.info("loaded %s (weights: %s, pre-trained tau %.4g)", architecture, pretrained or "random", tau)
    return CLIPBundle(model, tokenizer, int(size), mean, std, architecture, pretrained, tau)
