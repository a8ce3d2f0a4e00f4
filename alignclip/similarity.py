"""The class similarity matrix of appendix B.5: row-softmaxed cosine similarity of class text embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_similarity_matrix(text_features: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """[C, D] class text embeddings -> [C, C] matrix whose row i is softmax_j(scale * cos(T_i, T_j)).

    The paper (B.5) applies the softmax to the raw cosine similarities (``scale=1``); the authors' released
    code uses ``scale=35`` (see ``formulation: release``). Each row is the smoothing target for its class.
    """
    if text_features.dim() != 2:
        raise ValueError(f"text_features must be [C, D], got shape {tuple(text_features.shape)}")
    return (scale * cosine_matrix(text_features)).softmax(dim=-1)


def save_similarity(path, cosine: torch.Tensor, classes: list[str], architecture: str, pretrained: str | None) -> None:
    """The `similarity` stage's artifact: the raw cosine matrix of all classes and what produced it."""
    torch.save(
        {"cosine": cosine.cpu(), "classes": classes, "architecture": architecture, "pretrained": pretrained}, path
    )


def load_similarity(path, architecture: str, label_space: list[int], scale: float = 1.0) -> torch.Tensor:
    """Row-softmaxed similarity over a label space (a subset of the classes), from a saved cosine matrix.

    The softmax is taken over the label space's own columns, exactly as ``class_similarity_matrix`` of those
    classes' text features would.
    """
    from alignclip.files import load_torch

    state = load_torch(path, "similarity matrix")
    missing = [k for k in ("cosine", "architecture") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path}: not a similarity matrix of `alignclip similarity` (missing {', '.join(missing)})")
    if state["architecture"] != architecture:
        raise ValueError(
            f"{path}: similarity matrix was computed with {state['architecture']}, but training uses {architecture}"
        )
    index = torch.as_tensor(label_space)
    if int(index.max()) >= state["cosine"].shape[0]:
        raise ValueError(f"{path}: {state['cosine'].shape[0]} classes, label space needs index {int(index.max())}")
    return (scale * state["cosine"][index][:, index]).softmax(dim=-1)


def cosine_matrix(text_features: torch.Tensor) -> torch.Tensor:
    normed = F.normalize(text_features.float(), dim=-1)
    return normed @ normed.T
