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
    return row_softmax(cosine_matrix(text_features), scale)


def row_softmax(cosine: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Row i: softmax_j(scale * cosine[i, j]), the smoothing target of class i (the one place it is computed)."""
    return (scale * cosine).softmax(dim=-1)


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
    from alignclip.artifacts import load_torch

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
    return row_softmax(state["cosine"][index][:, index], scale)


def cosine_matrix(text_features: torch.Tensor) -> torch.Tensor:
    normed = F.normalize(text_features.float(), dim=-1)
    return normed @ normed.T


def similarity_stage(prepared_dir, out_dir, model: str, pretrained: str | None, scale: float, tracker) -> dict:
    """`alignclip similarity`: the raw cosine matrix of every class prompt (similarity.pt), its row softmax at
    ``scale`` (similarity.csv) and the heatmap (similarity.png, fig. 6). Returns the prepared dataset's meta."""
    from pathlib import Path

    import pandas as pd

    from alignclip import artifacts, determinism
    from alignclip.classifier import encode_classes
    from alignclip.data.prepare import load_prepared
    from alignclip.presets import load_clip
    from alignclip.figures import plot_similarity

    from alignclip.publish import stage_output

    out_dir = Path(out_dir)
    _, meta = load_prepared(prepared_dir)
    determinism.configure_torch("cpu", warn_only=True)  # computed on the CPU: the portable kernels (alignclip/determinism.py)
    bundle = load_clip(model, pretrained)
    text = encode_classes(bundle.model, bundle.tokenizer, meta["classes"], meta["template"], "cpu")
    cosine = cosine_matrix(text)
    # the three files are published together, replacing the folder (a transaction: no stale heatmap on failure)
    with stage_output(out_dir, "similarity", allowed=artifacts.SIMILARITY_FILES) as staging:
        save_similarity(staging / artifacts.SIMILARITY_MATRIX, cosine, meta["classes"], bundle.architecture, bundle.pretrained)
        soft = row_softmax(cosine, scale)
        pd.DataFrame(soft.numpy(), index=meta["classes"], columns=meta["classes"]).to_csv(staging / artifacts.SIMILARITY_CSV)
        plot_similarity(soft.numpy(), meta["classes"], staging / artifacts.SIMILARITY_HEATMAP, meta=meta, cosine=cosine.numpy(),
                        provenance={"model": bundle.architecture, "pretrained": bundle.pretrained, "scale": scale})
    tracker.log_params({"model": model, "pretrained": pretrained, "classes": len(meta["classes"]), "scale": scale})
    tracker.log_artifact(out_dir / artifacts.SIMILARITY_HEATMAP)
    tracker.log_artifact(out_dir / artifacts.SIMILARITY_CSV)
    return meta
