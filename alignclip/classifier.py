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
from alignclip.methods import MODEL_TAU, MethodConfig
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
    # a checkpoint records the temperatures it trained with (numbers); `model` is resolved for any that does not
    visual = make_visual(bundle, MethodConfig(**state.method).for_model(bundle.tau))
    if state.visual is not None:
        visual.visual.load_state_dict(state.visual)
    return bundle, visual.to(device).eval(), state


def checkpoint_tau(state: Checkpoint, bundle) -> float:
    """Eq. 1's temperature a checkpoint was trained with (train resolves `model` to the CLIP's own before saving);
    evaluation, zero-shot and the registered classifier all score with it."""
    tau = state.method["tau"]
    return bundle.tau if tau == MODEL_TAU else float(tau)


class ClassProbabilities(torch.nn.Module):
    """The deployable classifier (eq. 1): the image encoder against frozen class text features,
    softmax(cos(image, class) / tau) over the label space, [N, C]: the registered MLflow model. The same
    logits as evaluation (``cosine_logits``), which tests/test_pipeline.py checks on the logged model."""

    def __init__(self, visual: torch.nn.Module, text: torch.Tensor, tau: float):
        super().__init__()
        self.visual = visual
        self.register_buffer("text", text.detach().float().clone())
        self.tau = float(tau)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from alignclip.losses import cosine_logits

        return cosine_logits(self.visual(images).float(), self.text, self.tau).softmax(dim=-1)


def log_classifier(tracker, checkpoint: str | Path, meta: dict, tags: dict) -> None:
    """Log the trained model of a checkpoint as an MLflow model that returns class probabilities over its
    training label space (``ClassProbabilities``), register it as ``alignclip-<dataset>-<variant>`` and tag it
    (``tags``: the cell's tags, ``alignclip.tracking.cell_tags``)."""
    import numpy as np

    from alignclip import tracking

    bundle, visual, state = load_trained(checkpoint, "cpu")
    classes = [meta["classes"][g] for g in state.label_space]
    text = encode_classes(bundle.model, bundle.tokenizer, classes, meta["template"], "cpu")
    # eq. 1's temperature of training and evaluation: the checkpoint's resolved tau (the model's own by default)
    classifier = ClassProbabilities(visual, text, checkpoint_tau(state, bundle)).eval()
    # batch of 2: torch.export specialises a size-1 dimension, which would pin the model to batch 1
    example = np.zeros((2, 3, bundle.image_size, bundle.image_size), dtype=np.float32)
    name = tracking.registered_name(tags["dataset"], tags["variant"])
    metadata = {"classes": classes, "label_space": state.label_space, "output": "class probabilities [N, C]"}
    version = tracker.log_model(classifier, "classifier", name, example, metadata=metadata)
    if not tracker.online:  # the server is away: the model was not logged (a warning said so); nothing to tag
        return
    tracking.describe_registered_model(name, version, tags, classes, tracker.uri)
