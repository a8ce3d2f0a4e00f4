"""`alignclip evaluate`: top-1 accuracy of a trained (or zero-shot) model on each view of its protocol.

Inference is plain CLIP: the image embedding against the class prompt embeddings of the view's label space.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from alignclip import artifacts, protocols
from alignclip.artifacts import Checkpoint
from alignclip.classifier import encode_classes, load_trained, resolve_device
from alignclip.data.images import ManifestImages, eval_transform
from alignclip.data.prepare import load_prepared
from alignclip.log import get_logger
from alignclip.losses import cosine_logits

log = get_logger(__name__)


@torch.no_grad()
def predict(visual, text: torch.Tensor, loader, device, topk: int = 5, tau: float = 0.01):
    """Predicted class, target, dataset index, and the top-k classes with their probabilities (eq. 1, tau)."""
    preds, targets, indices, top, top_prob = [], [], [], [], []
    for images, target, index in loader:
        logits = cosine_logits(visual(images.to(device)).float(), text, tau)  # eq. 1, as in training
        best = logits.softmax(dim=-1).topk(min(topk, logits.shape[-1]), dim=-1)
        top.append(best.indices.cpu())
        top_prob.append(best.values.cpu())
        preds.append(logits.argmax(dim=-1).cpu())
        targets.append(target)
        indices.append(index)
    return torch.cat(preds), torch.cat(targets), torch.cat(indices), torch.cat(top), torch.cat(top_prob)


def check_consistent(path, state: Checkpoint, meta: dict, test_domain: str | None) -> str | None:
    """The checkpoint's held-out domain, after checking that the prepared dataset and the flag agree with it."""
    for key in ("dataset", "protocol"):
        if getattr(state, key) != meta[key]:
            raise ValueError(
                f"{path}: trained on {key} {getattr(state, key)!r}, but the prepared dataset has {key} {meta[key]!r}"
            )
    names = [meta["classes"][g] if 0 <= g < len(meta["classes"]) else None for g in state.label_space]
    if names != state.classes:
        raise ValueError(f"{path}: its label space's classes differ from the prepared dataset's classes at those indices")
    if test_domain not in (None, "") and test_domain != state.test_domain:
        raise ValueError(
            f"test domain {test_domain!r} contradicts {path}, trained with held-out domain {state.test_domain!r}; "
            "leave --test-domain out (the checkpoint says it)"
        )
    return state.test_domain


def evaluate(
    prepared_dir: str | Path,
    checkpoint: str | Path,
    out_dir: str | Path,
    test_domain: str | None = None,
    test_split: str = "holdout",
    batch_size: int = 128,
    num_workers: int = 0,
    device: str = "auto",
) -> dict:
    """Score a checkpoint on every evaluation view of its protocol; write metrics.json and predictions.parquet.

    The held-out domain, the method and the training label space come from the checkpoint; ``test_domain``
    need not be given, and one that contradicts the checkpoint is refused, as is a prepared dataset that is not
    the one the checkpoint was trained on.
    """
    out = Path(out_dir)
    manifest, meta = load_prepared(prepared_dir)
    protocol = protocols.get_protocol(meta["protocol"])
    dev = resolve_device(device)
    bundle, visual, state = load_trained(checkpoint, dev)
    test_domain = check_consistent(checkpoint, state, meta, test_domain)
    out.mkdir(parents=True, exist_ok=True)
    transform = eval_transform(bundle.image_size, bundle.mean, bundle.std)
    results: dict[str, dict] = {}
    prediction_frames = []
    for view in protocols.evaluation_views(manifest, meta, test_domain, test_split):
        if view.rows.empty:
            log.warning("view %s has no images: skipped", view.name)
            continue
        names = [meta["classes"][g] for g in view.label_space]
        text = encode_classes(bundle.model, bundle.tokenizer, names, meta["template"], dev)
        dataset = ManifestImages(meta, view.rows["path"].tolist(), view.rows["label"].tolist(), view.label_space, transform)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
        pred, target, index, top, top_prob = predict(visual, text, loader, dev, tau=state.method["tau"])
        correct = int((pred == target).sum())
        results[view.name] = {
            "accuracy": 100.0 * correct / len(target),
            "correct": correct,
            "total": int(len(target)),
            "classes": len(view.label_space),
            "skipped_images": dataset.skipped,
        }
        space = np.asarray(view.label_space)
        prediction_frames.append(
            pd.DataFrame(
                {
                    "view": view.name,
                    "path": view.rows["path"].to_numpy()[index.numpy()],
                    "label": space[target.numpy()],
                    "pred": space[pred.numpy()],
                    "top5": [",".join(str(space[j]) for j in row) for row in top.numpy()],
                    "top5_prob": [",".join(f"{p:.4f}" for p in row) for row in top_prob.numpy()],
                }
            )
        )
        log.info("%s: %.2f%% (%d/%d)", view.name, results[view.name]["accuracy"], correct, len(target))
    summary = {
        "dataset": meta["dataset"],
        "protocol": meta["protocol"],
        "test_domain": test_domain,
        "test_split": test_split if protocol.uses_test_split else None,
        "method": state.method["name"],
        "variant": state.variant,
        "seed": state.seed,
        "checkpoint": str(checkpoint),
        "formulation": state.formulation,
        "views": results,
    }
    summary.update(protocol.derived_metrics(results))
    headline = protocol.headline(summary)
    summary["headline"] = None if headline is None else {"metric": headline[0], "value": headline[1]}
    (out / artifacts.METRICS).write_text(json.dumps(summary, indent=2) + "\n")
    if prediction_frames:
        pd.concat(prediction_frames, ignore_index=True).to_parquet(out / artifacts.PREDICTIONS, index=False)
    return summary


def flat_metrics(summary: dict) -> dict[str, float]:
    """{'test_acc': ..., 'base_acc': ..., 'H': ...}: every view's accuracy and the protocol's derived metrics."""
    flat = {f"{name}_acc": v["accuracy"] for name, v in summary["views"].items()}
    flat.update(protocols.get_protocol(summary["protocol"]).derived_metrics(summary["views"]))
    return flat
