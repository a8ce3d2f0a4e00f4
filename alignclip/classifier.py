"""CLIP's classifier around a method: the image encoder a method trains, the class prompt features it scores
against, and the trained model read back from its checkpoint.

Training, evaluation, the report's figures and the CLI all build their model here, so a model trained by one
stage is rebuilt identically by the next.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignclip.artifacts import Checkpoint, load_checkpoint
from alignclip.data.registry import prompt
from alignclip.methods import MethodConfig
from alignclip.model import AlignCLIPVisual
from alignclip.presets import load_clip


def resolve_device(device: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def encode_classes(model, tokenizer, class_names: list[str], template: str, device) -> torch.Tensor:
    """Frozen, L2-normalised text features of the class prompts [C, D]."""
    tokens = tokenizer([prompt(template, name) for name in class_names]).to(device)
    features = []
    for chunk in tokens.split(256):
        features.append(model.encode_text(chunk).float())
    return torch.nn.functional.normalize(torch.cat(features), dim=-1)


def make_visual(bundle, method: MethodConfig) -> AlignCLIPVisual:
    """The image encoder of ``bundle`` wrapped with the alignment machinery the method switches on."""
    return AlignCLIPVisual(
        bundle.model.visual,
        aligned_layers=method.aligned_layers if method.aal else 0,
        dv_layers=method.dv_layers if method.aal else 0,
        branch=method.branch,
        pooling=method.pooling,
        cls_attn_norm=method.cls_attn_norm,
    )


def load_trained(checkpoint: str | Path, device) -> tuple[object, AlignCLIPVisual, Checkpoint]:
    """Rebuild the model of a ``train`` checkpoint: the base weights, then the fine-tuned image encoder."""
    state = load_checkpoint(checkpoint)
    bundle = load_clip(state.architecture, state.pretrained, device=device)
    visual = make_visual(bundle, MethodConfig(**state.method))
    if state.visual is not None:
        visual.visual.load_state_dict(state.visual)
    return bundle, visual.to(device).eval(), state


def log_image_encoder(tracker, checkpoint: str | Path, registered_name: str) -> None:
    """Log the trained image encoder of a checkpoint as an MLflow model and register it (input: a batch of
    images), through the tracker."""
    import numpy as np

    bundle, visual, _ = load_trained(checkpoint, "cpu")
    # batch of 2: torch.export specialises a size-1 dimension, which would pin the model to batch 1
    example = np.zeros((2, 3, bundle.image_size, bundle.image_size), dtype=np.float32)
    tracker.log_model(visual, "image_encoder", registered_name, example)
