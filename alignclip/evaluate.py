"""`alignclip evaluate`: top-1 accuracy of a trained (or zero-shot) model on each view of its protocol.

Inference is plain CLIP: the image embedding against the class prompt embeddings of the view's label space.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from alignclip import artifacts, determinism, protocols
from alignclip.artifacts import Checkpoint
from alignclip.config import DEFAULTS
from alignclip.classifier import checkpoint_tau, encode_classes, load_trained, resolve_device
from alignclip.data.images import ManifestImages, collate_readable, eval_transform
from alignclip.data.loader import AUTO, evaluation_loader, resolve_workers
from alignclip.data.prepare import load_prepared
from alignclip.publish import stage_output
from alignclip.log import get_logger
from alignclip.losses import cosine_logits

log = get_logger(__name__)


def inference_autocast(device: torch.device):
    """bfloat16 on a GPU, as training runs; full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.inference_mode()
def predict(visual, text: torch.Tensor, loader, device, tau: float, topk: int = 5):
    """Predicted class, target, dataset index, and the top-k classes with their probabilities (eq. 1, tau).

    Results stay on the device until the view is done: no host synchronisation per batch.
    """
    device = torch.device(device)
    preds, targets, indices, top, top_prob = [], [], [], [], []
    for batch in loader:
        if batch is None:  # every image of this batch was unreadable (collate_readable)
            continue
        images, target, index = batch
        with inference_autocast(device):
            embedding = visual(images.to(device, non_blocking=device.type == "cuda"))
        logits = cosine_logits(embedding.float(), text, tau)  # eq. 1, as in training
        best = logits.softmax(dim=-1).topk(min(topk, logits.shape[-1]), dim=-1)
        top.append(best.indices)
        top_prob.append(best.values)
        preds.append(logits.argmax(dim=-1))
        targets.append(target)
        indices.append(index)
    if not preds:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty, torch.zeros(0, topk, dtype=torch.long), torch.zeros(0, topk)
    return (torch.cat(preds).cpu(), torch.cat(targets), torch.cat(indices), torch.cat(top).cpu(),
            torch.cat(top_prob).cpu())


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
    test_split: str = DEFAULTS["data_test_split"],
    batch_size: int = DEFAULTS["evaluate_batch_size"],
    num_workers: int | str = AUTO,
    device: str = "auto",
    stage_remote: bool = True,
) -> dict:
    """Score a checkpoint on every evaluation view of its protocol; write metrics.json and predictions.parquet.

    The held-out domain, the method and the training label space come from the checkpoint; ``test_domain``
    need not be given, and one that contradicts the checkpoint is refused, as is a prepared dataset that is not
    the one the checkpoint was trained on. ``metrics.json`` also records ``images_per_s``, end to end (decode
    included), and the number of DataLoader workers (``num_workers``: a count or ``auto``). metrics.json and
    predictions.parquet are replaced together, only when the evaluation completes; the folder may be shared with
    `train`'s outputs, so only these two names are touched.
    """
    with stage_output(out_dir, "evaluate", owns=(artifacts.METRICS, artifacts.SCORES, artifacts.PREDICTIONS)) as staging:
        return _evaluate(prepared_dir, checkpoint, staging, test_domain, test_split, batch_size, num_workers, device,
                         stage_remote)


def _evaluate(prepared_dir, checkpoint, out: Path, test_domain, test_split, batch_size, num_workers, device,
              stage_remote) -> dict:
    manifest, meta = load_prepared(prepared_dir)
    protocol = protocols.get_protocol(meta["protocol"])
    dev = resolve_device(device)
    determinism.configure_torch(dev, warn_only=True)  # a CPU run: portable kernels; a GPU run as it is
    bundle, visual, state = load_trained(checkpoint, dev)
    test_domain = check_consistent(checkpoint, state, meta, test_domain)
    tau = checkpoint_tau(state, bundle)  # training's eq. 1 temperature (the model's own by default)
    reader = ViewReader(meta, bundle, eval_transform(bundle.image_size, bundle.mean, bundle.std), batch_size,
                        resolve_workers(num_workers), dev, stage_remote)
    results: dict[str, dict] = {}
    prediction_frames = []
    for view in protocols.evaluation_views(manifest, meta, test_domain, test_split):
        if view.rows.empty:
            log.warning("view %s has no images: skipped", view.name)
            continue
        results[view.name], frame = reader.evaluate(view, visual, tau)
        prediction_frames.append(frame)
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
        "tau": tau,  # eq. 1's temperature (training's); aal_tau: eq. 4's, None = no temperature
        "aal_tau": state.method.get("aal_tau"),
        "hparams": _trained_hparams(checkpoint),
        "views": results,
        "num_workers": reader.workers,
        "images_per_s": reader.images / reader.seconds if reader.seconds else None,
    }
    summary.update(protocol.derived_metrics(results))
    headline = protocol.headline(summary)
    summary["headline"] = None if headline is None else {"metric": headline[0], "value": headline[1]}
    _write_metrics(out, summary, prediction_frames)
    return summary


@dataclass
class ViewReader:
    """Scores the views of one evaluation with one model: their images read the same way, the time counted."""

    meta: dict
    bundle: object  # presets.CLIPBundle
    transform: object
    batch_size: int
    workers: int
    device: torch.device
    stage_remote: bool
    images: int = 0
    seconds: float = 0.0

    def evaluate(self, view, visual, tau: float) -> tuple[dict, pd.DataFrame]:
        """A view's accuracy (with its unreadable images, left out and counted, never replaced) and predictions."""
        names = [self.meta["classes"][g] for g in view.label_space]
        text = encode_classes(self.bundle.model, self.bundle.tokenizer, names, self.meta["template"], self.device)
        dataset = ManifestImages(self.meta, view.rows["path"].tolist(), view.rows["label"].tolist(), view.label_space,
                                 self.transform, skip_unreadable=True)
        if self.stage_remote:
            dataset.stage()
        loader = evaluation_loader(dataset, self.batch_size, self.workers, self.device, collate_fn=collate_readable)
        tic = time.perf_counter()
        pred, target, index, top, top_prob = predict(visual, text, loader, self.device, tau)
        self.seconds += time.perf_counter() - tic
        self.images += len(target)
        correct = int((pred == target).sum())
        # read from the indices that came back, so the count is right with DataLoader workers too
        unreadable = sorted(set(range(len(dataset))) - set(index.tolist()))
        if not len(target):
            raise ValueError(f"view {view.name}: none of its {len(dataset)} images is readable (first: {dataset.paths[0]})")
        result = {
            "accuracy": 100.0 * correct / len(target),
            "correct": correct,
            "total": int(len(target)),
            "classes": len(view.label_space),
            "unreadable": len(unreadable),
            "skipped_images": [dataset.paths[i] for i in unreadable],
        }
        log.info("%s: %.2f%% (%d/%d)", view.name, result["accuracy"], correct, len(target))
        space = np.asarray(view.label_space)
        frame = pd.DataFrame({
            "view": view.name,
            "path": view.rows["path"].to_numpy()[index.numpy()],
            "label": space[target.numpy()],
            "pred": space[pred.numpy()],
            "top5": [",".join(str(space[j]) for j in row) for row in top.numpy()],
            "top5_prob": [",".join(f"{p:.4f}" for p in row) for row in top_prob.numpy()],
        })
        return result, frame


def _write_metrics(out: Path, summary: dict, prediction_frames: list[pd.DataFrame]) -> None:
    (out / artifacts.METRICS).write_text(json.dumps(summary, indent=2) + "\n")
    # DVC's metrics file: only the numbers a comparison needs, so `dvc metrics show` / `dvc exp show` stay narrow
    (out / artifacts.SCORES).write_text(json.dumps(flat_metrics(summary), indent=2) + "\n")
    if prediction_frames:
        pd.concat(prediction_frames, ignore_index=True).to_parquet(out / artifacts.PREDICTIONS, index=False)


def _trained_hparams(checkpoint) -> dict:
    """The selection grid's settings of the cell (train.json beside the checkpoint); {} for a plain run."""
    trained = Path(checkpoint).parent / artifacts.TRAIN_SUMMARY
    return json.loads(trained.read_text()).get("hparams", {}) if trained.is_file() else {}


def flat_metrics(summary: dict) -> dict[str, float]:
    """{'test_acc_pct': ..., 'base_acc_pct': ..., 'H_pct': ...}: every view's accuracy and the protocol's derived
    metrics, for trackers and DVC; every value is a percentage, and the names say so."""
    flat = {f"{name}_acc_pct": v["accuracy"] for name, v in summary["views"].items()}
    derived = protocols.get_protocol(summary["protocol"]).derived_metrics(summary["views"])
    flat.update({f"{name}_pct": value for name, value in derived.items()})
    return flat
