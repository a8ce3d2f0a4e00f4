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

from alignclip import protocols
from alignclip.classifier import encode_classes, load_trained, resolve_device
from alignclip.data.images import ManifestImages, eval_transform
from alignclip.data.prepare import load_prepared
from alignclip.files import stage_output
from alignclip.log import get_logger

log = get_logger(__name__)


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


@torch.no_grad()
def predict(visual, text: torch.Tensor, loader, device, topk: int = 5, tau: float = 0.01):
    """Predicted class, target, dataset index, and the top-k classes with their probabilities (eq. 1, tau)."""
    preds, targets, indices, top, top_prob = [], [], [], [], []
    for images, target, index in loader:
        features = torch.nn.functional.normalize(visual(images.to(device)).float(), dim=-1)
        logits = features @ text.T / tau
        best = logits.softmax(dim=-1).topk(min(topk, logits.shape[-1]), dim=-1)
        top.append(best.indices.cpu())
        top_prob.append(best.values.cpu())
        preds.append(logits.argmax(dim=-1).cpu())
        targets.append(target)
        indices.append(index)
    return torch.cat(preds), torch.cat(targets), torch.cat(indices), torch.cat(top), torch.cat(top_prob)


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
    # metrics.json and predictions.parquet are replaced together, only when the evaluation completes; the folder
    # may be shared with `train`'s outputs, so only these two names are touched.
    with stage_output(out_dir, "evaluate", owns=("metrics.json", "predictions.parquet")) as staging:
        return _evaluate(prepared_dir, checkpoint, staging, test_domain, test_split, batch_size, num_workers, device)


def _evaluate(prepared_dir, checkpoint, out: Path, test_domain, test_split, batch_size, num_workers, device) -> dict:
    manifest, meta = load_prepared(prepared_dir)
    dev = resolve_device(device)
    bundle, visual, state = load_trained(checkpoint, dev)
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
        pred, target, index, top, top_prob = predict(visual, text, loader, dev, tau=state["method"].get("tau", 0.01))
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
        "test_split": test_split if meta["protocol"] == "domainbed" else None,
        "method": state["method"]["name"],
        "variant": state.get("variant", state["method"]["name"]),
        "seed": state.get("seed"),
        "checkpoint": str(checkpoint),
        "formulation": state.get("formulation", "paper"),
        "views": results,
    }
    if meta["protocol"] == "base2new" and {"base", "new"} <= set(results):
        summary["H"] = harmonic_mean(results["base"]["accuracy"], results["new"]["accuracy"])
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    if prediction_frames:
        pd.concat(prediction_frames, ignore_index=True).to_parquet(out / "predictions.parquet", index=False)
    return summary


def flat_metrics(summary: dict) -> dict[str, float]:
    """{'test_acc': ..., 'base_acc': ..., 'H': ...} for trackers and DVC."""
    flat = {f"{name}_acc": v["accuracy"] for name, v in summary["views"].items()}
    if "H" in summary:
        flat["H"] = summary["H"]
    return flat
