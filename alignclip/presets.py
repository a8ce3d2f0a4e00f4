"""Model presets: which open_clip architecture and weights a run uses, and how those weights are found.

A preset is data, as in open_clip: an architecture name plus a default ``pretrained`` source. The source can be
- an open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``...), downloaded by open_clip on first use;
- a local checkpoint file (``/models/ViT-B-16.pt``), the usual way on an offline cluster;
- an ``s3://bucket/key`` URI, fetched once into the local cache (``storage.fetch_object``, ``ALIGNCLIP_CACHE``);
- ``alignclip:digits``: the ``tiny`` preset's default, a small ViT CLIP pre-trained contrastively by the project
  on printed digits (alignclip/pretrain.py), built deterministically on first use and cached;
- ``none`` for random weights (seeded).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from alignclip import storage
from alignclip.clip_factory import CLIPBundle, build_clip, register_project_configs
from alignclip.config import DEFAULTS
from alignclip.log import get_logger

log = get_logger(__name__)



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
    if storage.is_s3(source):
        return str(storage.fetch_object(source))
    looks_like_path = os.sep in source or source.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path and not Path(source).is_file():
        raise FileNotFoundError(f"checkpoint file not found: {source} (model.pretrained)")
    return source


def check_model(name: str) -> str:
    """The open_clip architecture of a preset or architecture name; an unknown one is a ValueError (nothing loaded)."""
    import open_clip

    register_project_configs()
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
    to override it. The model itself is built by ``clip_factory.build_clip``.
    """
    preset = PRESETS.get(name.lower())
    architecture = check_model(name)
    if pretrained == "default":
        pretrained = preset.pretrained if preset else None
    weights = resolve_weights(pretrained)
    return build_clip(architecture, weights, pretrained, device)
