"""`alignclip train`: fine-tune the image encoder of a CLIP model with one method of the registry.

Three parts, read in one sitting: ``setup`` builds everything a run needs (settings, training rows, model,
frozen text features, similarity targets, the data loader, optimiser, BMA); ``train_step`` is one optimiser step of
the method's loss (``bench/`` times it); ``write_checkpoint`` writes the result. The loop in ``_loop`` is the
whole algorithm (Algorithm 1): text features are computed once with the frozen text encoder; each step samples a
batch (``batch_size`` images per training domain for multi-domain data, as CLIPood), computes the method's loss,
takes an AdamW step on a cosine schedule, folds the new weights into the Beta Moving Average and logs. The
averaged model is the result. Resume checkpoints, SIGTERM and storage failures are one object's
(``alignclip.resume.RunControl``), so the loop reads as the algorithm.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignclip import artifacts, config, determinism, protocols
from alignclip.bma import BetaMovingAverage
from alignclip.classifier import encode_classes, make_visual, resolve_device
from alignclip.data.images import ManifestImages, train_transform
from alignclip.data.loader import AUTO, BalancedLoader, resolve_workers
from alignclip.data.prepare import load_prepared
from alignclip.publish import output_lock, save_checkpoint, stage_output
from alignclip.log import get_logger
from alignclip.methods import DEFAULT_METHOD, MethodConfig, get_method, split_method, variant_label
from alignclip.model import AlignCLIPVisual
from alignclip.objective import compute_loss, loss_terms, term_names
from alignclip.presets import check_model, load_clip
from alignclip.resume import CheckpointStore, ResumeOptions, RunControl, default_location, store_for
from alignclip.similarity import class_similarity_matrix, load_similarity

log = get_logger(__name__)
IN_MEMORY_BYTES = 256 * 2**20  # decoded training images kept in memory when no worker process reads them


# The defaults of a training without resolved settings (library use, tests): the schema's (alignclip/config.py) with
# the fallback recipe folded in, by the one resolver. None is written here; `alignclip train` sets every field.
_RESOLVED = config.train_fields(config.resolve_train())


@dataclass
class TrainSettings:
    method: str = DEFAULT_METHOD
    formulation: str = _RESOLVED["formulation"]
    overrides: dict = field(default_factory=lambda: dict(_RESOLVED["overrides"]))  # method switches set above the method's own
    hparams: dict = field(default_factory=dict)  # a selection grid cell's varied settings (already applied), recorded
    model: str = _RESOLVED["model"]
    pretrained: str | None = _RESOLVED["pretrained"]
    test_domain: str | None = None
    seed: int = _RESOLVED["seed"]
    recipe: str | None = _RESOLVED["recipe"]
    steps: int | None = _RESOLVED["steps"]  # None: epochs x iters_per_epoch
    epochs: int | None = _RESOLVED["epochs"]
    iters_per_epoch: int | None = _RESOLVED["iters_per_epoch"]  # None: one pass over the training set
    shots: int | None = _RESOLVED["shots"]  # few-shot protocols: None/16 the prepared few-shot subset, 0 all training images
    batch_size: int = _RESOLVED["batch_size"]  # per training domain for multi-domain protocols
    lr: float = _RESOLVED["lr"]
    weight_decay: float = _RESOLVED["weight_decay"]
    hflip: bool = _RESOLVED["hflip"]
    crop_scale: tuple[float, float] = (0.7, 1.0)
    num_workers: int | str = AUTO  # DataLoader worker processes, or "auto" (from the CPUs this process may use)
    stage_remote: bool = True  # copy s3:// images to the local cache once before training (storage.stage)
    device: str = "auto"
    log_every: int = 10  # logged values are read from the device (one sync) and written every this many steps
    progress: bool = True


def apply_recipe(settings: TrainSettings, name: str, steps=None, batch_size=None, lr=None, epochs=None, hflip=None) -> TrainSettings:
    """``settings`` with a recipe's values under the explicit ones given here (``config.train_fields``: method <
    recipe < explicit); the recipe's method switches sit under the switches already set (``settings.overrides``).
    The recipe's length is the held-out domain's (``settings.test_domain``), its ``shots`` choose the few-shot
    protocols' training images."""
    values = {"train_recipe": name, "train_formulation": settings.formulation, "model_name": settings.model,
              "model_pretrained": settings.pretrained, "train_seed": settings.seed, "train_weight_decay": settings.weight_decay,
              "train_steps": steps, "train_epochs": epochs, "train_batch_size": batch_size, "train_lr": lr, "train_hflip": hflip}
    return replace(settings, **config.train_fields(values, settings.test_domain, settings.overrides, settings.method))


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
    datasets: list = field(default_factory=list)  # ManifestImages per balanced group (training domain)
    loader: BalancedLoader | None = None  # balanced batches of all groups; its state_dict() is {seed, step, ...}
    optimizer: torch.optim.Optimizer | None = None
    bma: BetaMovingAverage | None = None


@dataclass
class Plan:
    """What ``resolve`` settles before anything is loaded: the settings a run records, its method, data, device."""

    settings: TrainSettings
    method: MethodConfig
    manifest: object
    meta: dict
    rows: object
    label_space: list[int]
    device: torch.device


def resolve(prepared_dir: str | Path | None, settings: TrainSettings) -> Plan:
    """The settings a run uses (``alignclip+release`` splits into method and formulation, the suffix winning) and
    every check of them that needs no model: method and switches, held-out domain, device, model name. ``setup``
    starts here, and ``alignclip train --dry-run`` stops here, so both refuse and print the same.
    ``prepared_dir=None`` (a dry run before the data is prepared): everything but the data's checks (held-out domain)."""
    method_name, formulation = split_method(settings.method, settings.formulation)
    settings = replace(settings, method=method_name, formulation=formulation)
    method = get_method(settings.method, settings.formulation, **settings.overrides)
    device = resolve_device(settings.device)
    check_model(settings.model)
    if prepared_dir is None:
        return Plan(settings, method, None, {}, None, [], device)
    manifest, meta = load_prepared(prepared_dir)
    rows, label_space = protocols.training_set(manifest, meta, settings.test_domain, settings.seed, settings.shots)
    if rows.empty:
        raise ValueError(f"no training images for test domain {settings.test_domain!r} / seed {settings.seed}")
    return Plan(settings, method, manifest, meta, rows, label_space, device)


def setup(prepared_dir: str | Path, settings: TrainSettings, similarity_path: str | Path | None = None) -> TrainingRun:
    """Settings, training rows and label space, model, text features, similarity targets, the data loader, optimiser."""
    plan = resolve(prepared_dir, settings)
    settings, method, meta, label_space, device = plan.settings, plan.method, plan.meta, plan.label_space, plan.device
    torch.manual_seed(settings.seed)
    # a CPU run: portable kernels (alignclip/determinism.py), the same numbers on any x86-64 CPU with AVX2; a GPU run as it is
    cpu = {**determinism.configure_torch(device, warn_only=True), "model": determinism.cpu_model()} if device.type == "cpu" else None
    bundle = load_clip(settings.model, settings.pretrained, device=device)
    asked = method  # the switches as set (variant label); the run uses the loaded CLIP's own tau where they say `model`
    method = method.for_model(bundle.tau)
    class_names = [meta["classes"][g] for g in label_space]
    text = encode_classes(bundle.model, bundle.tokenizer, class_names, meta["template"], device)
    if similarity_path:
        class_sim = load_similarity(similarity_path, bundle.architecture, label_space, method.sls_scale).to(device)
    else:
        class_sim = class_similarity_matrix(text, scale=method.sls_scale)
    visual = make_visual(bundle, method).to(device)
    summary = _summary(plan, bundle, method, asked, visual, cpu)
    run = TrainingRun(settings, method, bundle, visual, text, class_sim, label_space, class_names, summary, device)
    if method.trains:
        _add_training(run, plan)
    return run


def _summary(plan: Plan, bundle, method: MethodConfig, asked: MethodConfig, visual: AlignCLIPVisual,
             cpu: dict | None) -> dict:
    """What train.json records of the run before it trains (``asked``: the switches as set, ``method`` as run)."""
    settings, meta = plan.settings, plan.meta
    return {
        "settings": asdict(settings),
        "method": method.to_dict(),
        "architecture": bundle.architecture,
        "pretrained": bundle.pretrained,
        "dataset": meta["dataset"],
        "protocol": meta["protocol"],
        "train_images": int(len(plan.rows)),
        "label_space": plan.label_space,
        "variant": variant_label(asked, settings.formulation, settings.recipe, settings.hparams),
        # the loaded CLIP's pre-trained temperature, 1 / exp(logit_scale); method.tau / method.aal_tau are the ones used
        "model_tau": bundle.tau,
        "hparams": dict(settings.hparams),  # what the selection grid varied: the report selects among these cells
        # what the encoder aligned: a CLIP ResNet has one attention layer whatever aligned_layers asks for
        "attention_layers": {"aligned": visual.aligned_layers, "dv": visual.dv_layers},
        "cpu": cpu,  # the kernels and CPU of a CPU run (None on a GPU)
    }


def _add_training(run: TrainingRun, plan: Plan) -> None:
    """The data loader, optimiser and BMA of a method that trains.

    Data: batch_size images of every training domain per step for multi-domain protocols (CLIPood), else
    batch_size images of the one group; all groups are read by one loader (one worker pool)."""
    settings, meta, rows, bundle, device = run.settings, plan.meta, plan.rows, run.bundle, run.device
    transform = train_transform(bundle.image_size, bundle.mean, bundle.std, settings.hflip, settings.crop_scale)
    group_key = protocols.get_protocol(meta["protocol"]).group_key
    groups = [g for _, g in rows.groupby(group_key, sort=True)] if group_key else [rows]
    run.steps = total_steps(settings, len(rows), len(groups))
    smallest = min(len(g) for g in groups)
    if settings.batch_size > smallest:  # refused, not clamped: train.json would report a batch that never ran
        raise ValueError(f"batch_size={settings.batch_size} is larger than the smallest training stream ({smallest} images); "
                         f"expected at most {smallest}")
    workers = resolve_workers(settings.num_workers)
    for group in groups:
        dataset = ManifestImages(meta, group["path"].tolist(), group["label"].tolist(), run.label_space, transform)
        if settings.stage_remote:
            dataset.stage()
        if not workers:  # read in this process: decode each image once (small data such as the embedded digits)
            dataset.keep_decoded_bytes = IN_MEMORY_BYTES // len(groups)
        run.datasets.append(dataset)
    run.loader = BalancedLoader(run.datasets, settings.batch_size, settings.seed, run.steps, workers, device)
    run.summary["num_workers"] = workers
    run.optimizer = make_optimizer(
        bundle, run.visual, settings.lr, settings.weight_decay, run.method.weight_decay_scope, fused=device.type == "cuda"
    )
    run.bma = BetaMovingAverage(run.visual, run.steps, run.method.bma_beta) if run.method.bma else None


def make_optimizer(
    bundle, visual: AlignCLIPVisual, lr: float, weight_decay: float, scope: str = "matrices", fused: bool = False
) -> torch.optim.AdamW:
    """AdamW over the image encoder only (the text encoder is frozen; its features are precomputed).

    ``scope`` (method switch ``weight_decay_scope``): ``matrices`` exempts biases, norms and embeddings from weight
    decay; ``all`` decays every parameter, as the released code's ``AdamW(classifier.parameters(), wd)``.
    ``fused``: one CUDA kernel for the whole update (GPU only).
    """
    for p in bundle.model.parameters():
        p.requires_grad_(False)
    for p in visual.parameters():
        p.requires_grad_(True)
    if scope == "all":
        return torch.optim.AdamW(
            [{"params": list(visual.parameters()), "weight_decay": weight_decay}], lr=lr, fused=fused or None
        )
    if scope != "matrices":
        raise ValueError(f"weight_decay_scope={scope!r}: expected 'matrices' or 'all'")
    decay = [p for n, p in visual.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in visual.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        fused=fused or None,
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
    grad_norms: bool = False,
) -> dict[str, torch.Tensor]:
    """One optimiser step of the method's loss; returns the loss's logged parts as detached device tensors
    (reading them is a host sync: the loop does it every ``log_every`` steps). bench/ times exactly this.

    ``grad_norms`` (the loop's log steps only): also the L2 norm of the gradient of each loss term as it enters the
    total (``grad_norm_<term>``, weight included) and of the total (``grad_norm_loss``) with respect to the
    trainable encoder parameters, one extra backward pass per term; the update itself is the same."""
    if not grad_norms:
        with autocast:
            loss, parts = compute_loss(method, visual, images, targets, text, class_sim)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return parts
    with autocast:
        loss, parts, terms = loss_terms(method, visual, images, targets, text, class_sim)
    params = [p for p in visual.parameters() if p.requires_grad]
    if len(terms) > 1:  # one term alone is the total, whose gradient backward() leaves in .grad
        for name, term in terms.items():
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            parts[f"grad_norm_{name}"] = gradient_norm(grads)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parts["grad_norm_loss"] = gradient_norm([p.grad for p in params])
    if len(terms) == 1:
        parts[f"grad_norm_{next(iter(terms))}"] = parts["grad_norm_loss"]
    optimizer.step()
    return parts


def gradient_norm(grads) -> torch.Tensor:
    """L2 norm over every parameter's gradient (None: no gradient, zero), as a device tensor (no host sync)."""
    norms = [g.detach().float().norm() for g in grads if g is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def grad_norm_columns(method: MethodConfig) -> list[str]:
    """train_log.csv's gradient-norm columns for a method: one per loss term, then the total's."""
    return [f"grad_norm_{name}" for name in term_names(method)] + ["grad_norm_loss"]


def write_checkpoint(path: str | Path, run: TrainingRun, visual: AlignCLIPVisual | None) -> Path:
    """The run's checkpoint (``visual=None``: the pre-trained image encoder, zero-shot), schema in artifacts.py."""
    settings, bundle = run.settings, run.bundle
    checkpoint = artifacts.Checkpoint(
        visual=None if visual is None else visual.visual.state_dict(),
        method=run.method.to_dict(),
        variant=run.summary["variant"],
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
    return save_checkpoint(path, checkpoint)


def train(
    prepared_dir: str | Path,
    out_dir: str | Path,
    settings: TrainSettings,
    tracker=None,
    similarity_path: str | Path | None = None,
    callbacks: list | None = None,
    resume: ResumeOptions | None = None,
) -> dict:
    """Train one (method, held-out domain, seed) and write its checkpoint, log and summary (artifacts.py).

    The outputs are published together when training completes: they are written into a staging folder beside
    ``out_dir`` that then replaces it (a rerun leaves nothing stale; a failed run leaves the previous outputs).
    With ``resume`` (the CLI's default) a resume checkpoint is written as the run goes and at SIGTERM, and a
    re-run of the same settings continues from it (see ``alignclip.resume``).

    ``callbacks`` are called after every optimiser step as ``callback(step, visual, parts)`` (``parts``: the
    loss's parts as device tensors).

    ``train_log.csv`` has a row per step; its values are kept on the device and read every ``log_every`` steps
    (one host sync per window, not one per value per step). ``images_per_s`` is end to end over the window
    (data, step, BMA, logging) and ``data_wait_s`` the mean time per step spent waiting for a batch.
    """
    out = Path(out_dir)
    store = store_for(out, resume)
    with output_lock(out):  # the resume checkpoint is this output's too: written and cleared by its one writer
        with stage_output(out, "train", allowed=artifacts.CELL_FILES) as staging:
            run = setup(prepared_dir, settings, similarity_path)
            _start_tracking(run, tracker)
            summary = _loop(run, staging, tracker, callbacks, store, resume) if run.method.trains else _zero_shot(run, staging)
        if store is not None:
            store.clear()  # after the outputs are safe: a crash in between resumes at the last step, same result
            if store.location == str(default_location(out)):
                shutil.rmtree(store.location, ignore_errors=True)
    log.info("outputs -> %s", out)
    return summary


def _fingerprint(run: TrainingRun) -> str:
    """What a resume checkpoint must agree with to be continued (not how the run is executed or shown)."""
    settings = {k: v for k, v in asdict(run.settings).items() if k not in ("progress", "log_every", "num_workers", "stage_remote", "device")}
    return json.dumps(
        {"settings": settings, "method": run.method.to_dict(), "steps": run.steps, "label_space": run.label_space,
         "train_images": run.summary["train_images"], "architecture": run.bundle.architecture,
         "pretrained": run.bundle.pretrained},
        sort_keys=True, default=str,
    )


def _start_tracking(run: TrainingRun, tracker) -> None:
    """The cell's MLflow run: `alignclip evaluate` of this checkpoint logs into the same run."""
    summary = run.summary
    summary["mlflow_run_id"] = tracker.run_id if getattr(tracker, "enabled", False) else None
    if tracker is not None:
        tracker.log_params({"method": run.method.to_dict(), "train": asdict(run.settings), "dataset": summary["dataset"],
                            "model_tau": summary["model_tau"]})


def _zero_shot(run: TrainingRun, out: Path) -> dict:
    """A method that does not train (zero-shot): the pre-trained encoder's checkpoint, no steps."""
    write_checkpoint(out / artifacts.MODEL, run, None)
    (out / artifacts.TRAIN_SUMMARY).write_text(json.dumps({**run.summary, "steps": 0}, indent=2) + "\n")
    (out / artifacts.TRAIN_LOG).write_text("step,loss\n")
    log.info("zero-shot: nothing to train")
    return run.summary


def _loop(run: TrainingRun, out: Path, tracker, callbacks, store: CheckpointStore | None, resume) -> dict:
    """Algorithm 1: sample a batch (``batch_size`` images of every training domain), take an AdamW step of the
    method's loss at the cosine schedule's rate, fold the weights into the BMA, log. Resume, preemption and
    storage errors are ``control``'s (alignclip.resume.RunControl); the log window reads the device once a window."""
    method, visual, optimizer, loader = run.method, run.visual, run.optimizer, run.loader
    control = RunControl(run, store, resume, _fingerprint(run), tracker)  # continues a matching resume checkpoint
    window = LogWindow.for_run(out / artifacts.TRAIN_LOG, run, tracker, prefix=control.log_prefix)
    autocast = autocast_for(run.device)
    visual.train()
    with window, control.watching(window):
        for images, targets in loader:
            step = loader.step  # steps done, this one included
            lr = set_lr(optimizer, cosine_lr(step - 1, run.steps, run.settings.lr))
            parts = train_step(method, visual, optimizer, images, targets, run.text, run.class_sim, autocast,
                               grad_norms=window.measures(step))
            bma_weight = run.bma.update(visual) if run.bma is not None else 0.0
            for callback in callbacks or []:
                callback(step, visual, parts)
            window.record(step, parts, lr=lr, bma_weight=bma_weight, images=len(images))
            control.after_step(step)  # a resume checkpoint when due; at SIGTERM one, then Preempted
    return _finish(run, out, control, window)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _finish(run: TrainingRun, out: Path, control: RunControl, window: LogWindow) -> dict:
    """The averaged model (BMA, else the last weights) as the checkpoint, and train.json."""
    own = time.perf_counter() - control.started  # this process's share (throughput); elapsed includes a resumed run's past
    elapsed = control.seconds_before + own
    final = run.bma.module if run.bma is not None else run.visual
    skipped = sorted({p for dataset in run.datasets for p in dataset.skipped})
    write_checkpoint(out / artifacts.MODEL, run, final)
    run.summary.update(steps=run.steps, seconds=elapsed, skipped_images=skipped, bma=run.method.bma,
                       resumed_from=control.start or None, images_per_s=window.images / own,
                       data_wait_s=run.loader.data_wait_s)
    (out / artifacts.TRAIN_SUMMARY).write_text(json.dumps(run.summary, indent=2) + "\n")
    log.info("trained %s for %d steps in %.1fs", run.method.name, run.steps, elapsed)
    return run.summary


class LogWindow:
    """The logged values of the last ``every`` steps, kept on the device and written to ``train_log.csv`` (and the
    tracker) together: one host synchronisation per window instead of one per value per step. The log starts with
    ``prefix``, a resumed run's earlier rows (the killed run may have logged steps past its checkpoint); rows are
    flushed window by window, so the file is readable while the run goes. Shows the progress bar too."""

    def __init__(self, path: Path, total_steps: int, every: int, device: torch.device, tracker, loader: BalancedLoader,
                 prefix: str = "", grad_columns: list[str] | None = None, progress: bool = False, desc: str = ""):
        self.path, self.total_steps, self.every = path, total_steps, max(1, int(every))
        # gradient norms, measured on the first step and where a window closes (``measures``); empty cells elsewhere
        self.grad_columns = list(grad_columns or [])
        self.grad_rows: dict[int, torch.Tensor] = {}
        self.prefix = prefix  # rows of a resumed run's earlier steps, header included
        self.device, self.tracker, self.loader = device, tracker, loader
        self.columns: list[str] | None = prefix.splitlines()[0].split(",") if prefix else None
        self.rows: list[tuple[int, torch.Tensor, float, float]] = []  # (step, stacked parts, lr, bma weight)
        self.window_images = 0
        self.images = 0
        self.handle = None
        self.progress, self.desc, self.bar = progress, desc, None

    @classmethod
    def for_run(cls, path: Path, run: TrainingRun, tracker, prefix: str = "") -> LogWindow:
        return cls(path, run.steps, run.settings.log_every, run.device, tracker, run.loader, prefix,
                   grad_norm_columns(run.method), run.settings.progress, run.method.name)

    def __enter__(self):
        self.handle = self.path.open("w")
        self.handle.write(self.prefix)
        self.handle.flush()
        self.bar = tqdm(total=self.total_steps, initial=self.loader.step, desc=self.desc, disable=not self.progress,
                        dynamic_ncols=True)
        self.started = time.perf_counter()
        self.wait_started = self.loader.data_wait_s
        return self

    def __exit__(self, *exc):
        self.bar.close()
        self.handle.close()

    def record(self, step: int, parts: dict[str, torch.Tensor], lr: float, bma_weight: float, images: int) -> None:
        """One step's values; where a window closes, its rows are written and its means shown and logged."""
        self.add(step, parts, lr=lr, bma_weight=bma_weight, images=images)
        self.bar.update(1)
        if self.closes(step):
            means = self.write()
            self.bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{means['images_per_s']:.0f}")
            log.info("step %d/%d %s", step, self.total_steps, " ".join(f"{k}={v:.4g}" for k, v in means.items()))

    def add(self, step: int, parts: dict[str, torch.Tensor], lr: float, bma_weight: float, images: int) -> None:
        grads = {k: parts[k] for k in self.grad_columns if k in parts}
        parts = {k: v for k, v in parts.items() if k not in self.grad_columns}
        if self.columns is None:
            self.columns = ["step", *parts, *self.grad_columns, "lr", "bma_weight", "images_per_s", "data_wait_s"]
            self.handle.write(",".join(self.columns) + "\n")
        self.rows.append((step, torch.stack([v.float() for v in parts.values()]), lr, bma_weight))
        if grads:
            self.grad_rows[step] = torch.stack([grads[k].float() for k in self.grad_columns])
        self.window_images += images

    def text(self) -> str:
        """Everything written so far (what a resume checkpoint keeps)."""
        self.handle.flush()
        return self.path.read_text()

    def closes(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def measures(self, step: int) -> bool:
        """Whether this step measures the loss terms' gradient norms: the first step and every window's last."""
        return bool(self.grad_columns) and (step == 1 or self.closes(step))

    def write(self) -> dict[str, float]:
        """Read the window from the device, write its rows, return its means (with the throughput figures)."""
        values = torch.stack([row[1] for row in self.rows]).cpu()  # the one synchronisation of the window
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the window's time includes its last optimiser step and BMA
        now = time.perf_counter()
        steps = len(self.rows)
        throughput = {
            "images_per_s": self.window_images / (now - self.started),
            "data_wait_s": (self.loader.data_wait_s - self.wait_started) / steps,
        }
        names = self.columns[1 : 1 + values.shape[1]]
        grads = {}
        if self.grad_rows:  # a second read, on log steps only
            steps_measured = list(self.grad_rows)
            grads = dict(zip(steps_measured, torch.stack([self.grad_rows[s] for s in steps_measured]).cpu().tolist()))
        for (step, _, lr, bma_weight), row in zip(self.rows, values.tolist()):
            record = {**dict(zip(names, row)), **dict(zip(self.grad_columns, grads.get(step, []))), "lr": lr,
                      "bma_weight": bma_weight, **throughput}
            self.handle.write(",".join([str(step), *(f"{record[c]:.6g}" if c in record else "" for c in self.columns[1:])]) + "\n")
            if self.tracker is not None:
                self.tracker.log_metrics(record, step=step)
        self.handle.flush()
        means = {**dict(zip(names, values.mean(dim=0).tolist())), **throughput}
        if grads:  # the window's last measurement
            means.update(zip(self.grad_columns, grads[max(grads)]))
        self.images += self.window_images
        self.rows, self.window_images, self.grad_rows = [], 0, {}
        self.started, self.wait_started = time.perf_counter(), self.loader.data_wait_s
        return means


def cell_tags(settings: TrainSettings, meta: dict) -> dict:
    """The MLflow tags of the grid cell this training belongs to (``alignclip.tracking.cell_tags``)."""
    from alignclip import tracking

    name, formulation = split_method(settings.method, settings.formulation)
    settings = replace(settings, method=name, formulation=formulation)
    method = get_method(name, formulation, **settings.overrides)
    return tracking.cell_tags(
        meta["dataset"], meta["protocol"], name, variant_label(method, formulation, settings.recipe, settings.hparams), formulation,
        settings.test_domain, settings.seed, settings.hparams,
    )
