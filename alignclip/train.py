"""`alignclip train`: fine-tune the image encoder of a CLIP model with one method of the registry.

Three parts, read in one sitting: ``setup`` builds everything a run needs (settings, training rows, model,
frozen text features, similarity targets, data streams, optimiser, BMA); ``train_step`` is one optimiser step of
the method's loss (``bench/`` times it); ``write_checkpoint`` writes the result. The loop in ``train`` is the
whole algorithm (Algorithm 1): text features are computed once with the frozen text encoder; each step samples a
batch (``batch_size`` images per training domain for multi-domain data, as
CLIPood), computes the method's loss, takes an AdamW step on a cosine schedule and folds the new weights into
the Beta Moving Average. The averaged model is the result.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from alignclip import artifacts, protocols
from alignclip.bma import BetaMovingAverage
from alignclip.classifier import encode_classes, make_visual, resolve_device
from alignclip.data.images import ManifestImages, train_transform
from alignclip.data.prepare import load_prepared
from alignclip.log import get_logger
from alignclip.methods import MethodConfig, get_method, split_method
from alignclip.model import AlignCLIPVisual
from alignclip.objective import compute_loss
from alignclip.presets import load_clip
from alignclip.similarity import class_similarity_matrix, load_similarity

log = get_logger(__name__)


@dataclass
class TrainSettings:
    method: str = "alignclip"
    formulation: str = "paper"
    overrides: dict = field(default_factory=dict)  # individual method switches (ablations)
    model: str = "tiny"
    pretrained: str | None = "default"
    test_domain: str | None = None
    seed: int = 0
    recipe: str | None = None
    steps: int | None = 5000  # None: epochs x iters_per_epoch
    epochs: int | None = None
    iters_per_epoch: int | None = None  # None: one pass over the training set
    batch_size: int = 36  # per training domain for multi-domain protocols
    lr: float = 5e-6
    weight_decay: float = 0.1
    hflip: bool = True
    crop_scale: tuple[float, float] = (0.7, 1.0)
    num_workers: int = 0
    device: str = "auto"
    log_every: int = 10
    progress: bool = True


def total_steps(settings: TrainSettings, train_images: int, domains: int) -> int:
    if settings.steps:
        return int(settings.steps)
    if not settings.epochs:
        raise ValueError("set train steps, or epochs (with iters_per_epoch) through a recipe")
    per_epoch = settings.iters_per_epoch or max(1, math.ceil(train_images / (settings.batch_size * domains)))
    return int(settings.epochs * per_epoch)


def cosine_lr(step: int, total: int, base_lr: float) -> float:
    """Cosine decay from ``base_lr`` at step 0 towards 0 at ``total``, no warm-up (CLIPood)."""
    progress = step / max(1, total)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def infinite_batches(dataset, batch_size: int, generator: torch.Generator, num_workers: int):
    """Endless shuffled batches of one dataset (reshuffled each pass, seeded)."""
    loader = DataLoader(
        dataset,
        batch_size=min(batch_size, len(dataset)),
        sampler=RandomSampler(dataset, generator=generator),
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    while True:
        yield from loader


@dataclass
class TrainingRun:
    """Everything ``setup`` builds for one (method, held-out domain, seed): read by the loop and the checkpoint."""

    settings: TrainSettings
    method: MethodConfig
    bundle: object  # presets.CLIPBundle
    visual: AlignCLIPVisual
    text: torch.Tensor  # frozen class text features of the training label space [C, D]
    class_sim: torch.Tensor  # SLS targets over the training label space [C, C]
    label_space: list[int]
    classes: list[str]  # names of the label space's classes
    summary: dict  # what train.json records
    device: torch.device
    steps: int = 0
    streams: list = field(default_factory=list)  # (dataset, endless batches) per balanced group
    optimizer: torch.optim.Optimizer | None = None
    bma: BetaMovingAverage | None = None


def setup(prepared_dir: str | Path, settings: TrainSettings, similarity_path: str | Path | None = None) -> TrainingRun:
    """Settings, training rows and label space, model, text features, similarity targets, data streams, optimiser."""
    method_name, formulation = split_method(settings.method, settings.formulation)
    settings = replace(settings, method=method_name, formulation=formulation)
    method = get_method(settings.method, settings.formulation, **settings.overrides)
    manifest, meta = load_prepared(prepared_dir)
    rows, label_space = protocols.training_set(manifest, meta, settings.test_domain, settings.seed)
    if rows.empty:
        raise ValueError(f"no training images for test domain {settings.test_domain!r} / seed {settings.seed}")
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    bundle = load_clip(settings.model, settings.pretrained, device=device)
    class_names = [meta["classes"][g] for g in label_space]
    text = encode_classes(bundle.model, bundle.tokenizer, class_names, meta["template"], device)
    if similarity_path:
        class_sim = load_similarity(similarity_path, bundle.architecture, label_space, method.sls_scale).to(device)
    else:
        class_sim = class_similarity_matrix(text, scale=method.sls_scale)
    visual = make_visual(bundle, method).to(device)
    summary = {
        "settings": asdict(settings),
        "method": method.to_dict(),
        "architecture": bundle.architecture,
        "pretrained": bundle.pretrained,
        "dataset": meta["dataset"],
        "protocol": meta["protocol"],
        "train_images": int(len(rows)),
        "label_space": label_space,
    }
    run = TrainingRun(settings, method, bundle, visual, text, class_sim, label_space, class_names, summary, device)
    if not method.trains:
        return run

    # Data: one stream per training domain for multi-domain protocols (CLIPood), else one stream.
    transform = train_transform(bundle.image_size, bundle.mean, bundle.std, settings.hflip, settings.crop_scale)
    group_key = protocols.get_protocol(meta["protocol"]).group_key
    groups = [g for _, g in rows.groupby(group_key, sort=True)] if group_key else [rows]
    generator = torch.Generator().manual_seed(settings.seed)
    run.steps = total_steps(settings, len(rows), len(groups))
    for group in groups:
        dataset = ManifestImages(meta, group["path"].tolist(), group["label"].tolist(), label_space, transform)
        run.streams.append((dataset, infinite_batches(dataset, settings.batch_size, generator, settings.num_workers)))
    run.optimizer = make_optimizer(bundle, visual, settings.lr, settings.weight_decay)
    run.bma = BetaMovingAverage(visual, run.steps, method.bma_beta) if method.bma else None
    return run


def make_optimizer(bundle, visual: AlignCLIPVisual, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the image encoder only (the text encoder is frozen; its features are precomputed); no weight
    decay on biases, norms and embeddings."""
    for p in bundle.model.parameters():
        p.requires_grad_(False)
    for p in visual.parameters():
        p.requires_grad_(True)
    decay = [p for n, p in visual.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in visual.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


def autocast_for(device: torch.device):
    """bfloat16 autocast on a GPU; full precision on the CPU (bit-for-bit reproducible runs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train_step(
    method: MethodConfig,
    visual: AlignCLIPVisual,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    text: torch.Tensor,
    class_sim: torch.Tensor,
    autocast,
) -> dict[str, float]:
    """One optimiser step of the method's loss; returns the loss's logged parts (bench/ times exactly this)."""
    with autocast:
        loss, parts = compute_loss(method, visual, images, targets, text, class_sim)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return parts


def write_checkpoint(path: str | Path, run: TrainingRun, visual: AlignCLIPVisual | None) -> Path:
    """The run's checkpoint (``visual=None``: the pre-trained image encoder, zero-shot), schema in artifacts.py."""
    settings, bundle = run.settings, run.bundle
    checkpoint = artifacts.Checkpoint(
        visual=None if visual is None else visual.visual.state_dict(),
        method=run.method.to_dict(),
        variant=variant_label(run.method, settings),
        architecture=bundle.architecture,
        pretrained=bundle.pretrained,
        model=settings.model,
        formulation=settings.formulation,
        seed=settings.seed,
        recipe=settings.recipe,
        dataset=run.summary["dataset"],
        protocol=run.summary["protocol"],
        test_domain=settings.test_domain,
        label_space=run.label_space,
        classes=run.classes,
    )
    return artifacts.save_checkpoint(path, checkpoint)


def train(
    prepared_dir: str | Path,
    out_dir: str | Path,
    settings: TrainSettings,
    tracker=None,
    similarity_path: str | Path | None = None,
    callbacks: list | None = None,
) -> dict:
    """Train one (method, held-out domain, seed) and write its checkpoint, log and summary (artifacts.py).

    ``callbacks`` are called after every optimiser step as ``callback(step, visual, parts)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = setup(prepared_dir, settings, similarity_path)
    settings, method, summary = run.settings, run.method, run.summary
    if tracker is not None:
        tracker.log_params({"method": method.to_dict(), "train": asdict(settings), "dataset": summary["dataset"]})
    if not method.trains:
        write_checkpoint(out / artifacts.MODEL, run, None)
        (out / artifacts.TRAIN_SUMMARY).write_text(json.dumps({**summary, "steps": 0}, indent=2) + "\n")
        (out / artifacts.TRAIN_LOG).write_text("step,loss\n")
        log.info("zero-shot: nothing to train")
        return summary

    visual, steps, autocast = run.visual, run.steps, autocast_for(run.device)
    columns = None
    visual.train()
    started = time.perf_counter()
    bar = tqdm(range(steps), desc=f"{method.name}", disable=not settings.progress, dynamic_ncols=True)
    with (out / artifacts.TRAIN_LOG).open("w") as log_file:
        for step in bar:
            lr = cosine_lr(step, steps, settings.lr)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            batches = [next(stream) for _, stream in run.streams]
            images = torch.cat([b[0] for b in batches]).to(run.device, non_blocking=True)
            targets = torch.cat([b[1] for b in batches]).to(run.device, non_blocking=True)
            tic = time.perf_counter()
            parts = train_step(method, visual, run.optimizer, images, targets, run.text, run.class_sim, autocast)
            bma_weight = run.bma.update(visual) if run.bma is not None else 0.0
            for callback in callbacks or []:
                callback(step + 1, visual, parts)
            parts.update(lr=lr, bma_weight=bma_weight, images_per_s=len(images) / (time.perf_counter() - tic))
            if columns is None:
                columns = ["step", *parts]
                log_file.write(",".join(columns) + "\n")
            log_file.write(",".join([str(step + 1), *(f"{parts[c]:.6g}" for c in columns[1:])]) + "\n")
            bar.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{lr:.2e}")
            if tracker is not None:
                tracker.log_metrics(parts, step=step + 1)
            if (step + 1) % settings.log_every == 0 or step + 1 == steps:
                log.info("step %d/%d %s", step + 1, steps, " ".join(f"{k}={v:.4g}" for k, v in parts.items()))
    elapsed = time.perf_counter() - started
    final = run.bma.module if run.bma is not None else visual
    skipped = sorted({p for dataset, _ in run.streams for p in dataset.skipped})
    write_checkpoint(out / artifacts.MODEL, run, final)
    summary.update(steps=steps, seconds=elapsed, skipped_images=skipped, bma=method.bma)
    (out / artifacts.TRAIN_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    log.info("trained %s for %d steps in %.1fs -> %s", method.name, steps, elapsed, out / artifacts.MODEL)
    return summary


def variant_label(method: MethodConfig, settings: TrainSettings) -> str:
    """``alignclip``, ``alignclip+release``, or with the switches that differ from the method's (and recipe's)
    defaults: ``erm[pooling=avg]``. Reports label rows with it, so ablations do not mix with the method."""
    from alignclip.recipes import get_recipe

    recipe = get_recipe(settings.recipe).method if settings.recipe else {}
    base = get_method(method.name, settings.formulation, **recipe).to_dict()
    changed = {k: v for k, v in method.to_dict().items() if base.get(k) != v}
    label = method.name if settings.formulation == "paper" else f"{method.name}+{settings.formulation}"
    if changed:
        label += "[" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())) + "]"
    return label
