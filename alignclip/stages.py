"""The stage layer: between the command line (alignclip/cli.py, which only parses) and the library. One function per
stage takes the stage's settings, resolves them (alignclip/config.py, the one resolver), makes the checks that need
no data or model, finds the resume location, and runs the stage under its tracking and registration.

Import cost: this module imports only the settings schema at the top, so `alignclip --help` and a refused value stay
fast; torch and the stage's library modules load inside the functions, after their checks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from alignclip.config import ConfigError, check_method_switches, check_output_dir, check_template
from alignclip.log import get_logger

log = get_logger(__name__)
# how a run is executed or shown, not what it trains: left out of `train --dry-run`'s settings
DRY_RUN_HIDDEN = ("progress", "device", "num_workers", "stage_remote", "log_every")


@dataclass(frozen=True)
class Execution:
    """How a training runs, not what it trains: its workers, staging of remote images, device, progress bar."""

    num_workers: str
    stage_remote: bool
    device: str
    progress: bool


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often a training writes its resume checkpoint, and whether it resumes from one."""

    directory: str | None
    every: int
    minutes: float
    resume: bool

    def check(self) -> "Checkpointing":
        if self.every < 0 or self.minutes < 0:
            raise ConfigError(f"--checkpoint-every {self.every} / --checkpoint-minutes {self.minutes}: expected 0 or more")
        return self


def check_prepared(prepared_dir: Path) -> None:
    # load_prepared's first check, made before a stage's imports (torch), so a mistyped folder is refused at once
    from alignclip import artifacts

    for name in (artifacts.MANIFEST, artifacts.META):
        if not (prepared_dir / name).is_file():
            raise ConfigError(f"{prepared_dir / name} not found: run `alignclip prepare` first")


def check_workers(value: str) -> None:
    # data.loader.resolve_workers' rule (a count >= 0 or auto), checked without importing the loader, which needs
    # torch (tests/test_cli.py holds the two to the same answers)
    if value.lower() == "auto":
        return
    try:
        workers = int(value)
    except ValueError:
        workers = -1
    if workers < 0:
        raise ConfigError(f"--num-workers {value!r}: expected a count >= 0 or 'auto'")


def prepare(dataset: str, root: str, out_dir: Path, explicit: dict, params_file: Path | None, template: str | None,
            split_file: str | None, name: str | None, validate: bool) -> str:
    """`alignclip prepare`: the dataset listed and split by its protocol (params file < explicit options), the
    manifest and its metadata written; returns the result line."""
    from alignclip.config import resolve_stage

    value = resolve_stage(params_file, explicit)
    sample_seeds = value["data_sample_seeds"] or value["train_seeds"]  # the few-shot samples' own seeds, else the grid's
    check_template(template)
    check_output_dir(out_dir)
    from alignclip.data.prepare import PrepareSettings, prepare as run_prepare, validate_images, write_prepared

    settings = PrepareSettings(
        dataset, root, value["data_protocol"] or "", value["data_holdout_fraction"], value["data_trial_seed"],
        value["data_shots"], list(sample_seeds), template, split_file,
        templates=value["data_templates"], class_names=value["data_class_names"], listing=value["data_listing"], name=name,
    )
    manifest, meta = run_prepare(settings)
    if validate:
        bad = validate_images(manifest, meta)
        meta["unreadable_images"] = [{"path": p, "error": e} for p, e in bad]
        if bad:
            log.warning("%d unreadable image(s), listed in meta.json; training and evaluation will skip them", len(bad))
    write_prepared(manifest, meta, out_dir)
    return f"{meta['dataset']} ({meta['protocol']}): {len(manifest)} images, {len(meta['classes'])} classes -> {out_dir}"


def parse_switches(items: list[str]) -> dict:
    """``--set key=value`` pairs; values are parsed as JSON when they can be (numbers, true/false, null), then typed
    by the method registry (``methods.check_switches``)."""
    overrides = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return check_method_switches(overrides)


def _cell_values(entry: str, hparam: list[str], set_items: list[str], explicit: dict) -> tuple[str, dict, dict, dict]:
    """(method, the grid cell's hparams, method switches, explicit training values) of ``--method ENTRY``,
    ``--hparam`` and ``--set``: a grid cell's values beat the entry's brackets, which beat the options."""
    from alignclip.config import _grid_value, parse_entry, typed_grid_values

    method, in_brackets = parse_entry(entry, "--method: ")  # alignclip[aal=false]: switches of the entry
    entry_switches, entry_train = typed_grid_values(in_brackets, "--method: ")
    hparams = {}
    for item in hparam:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--hparam {item!r}: expected key=value")
        hparams[key.strip()] = _grid_value(value.strip())
    grid_switches, grid_train = typed_grid_values(hparams, "--hparam ")
    hparams = {k: grid_switches.get(k, grid_train.get(f"train_{k}")) for k in hparams}
    switches = {**entry_switches, **parse_switches(set_items), **grid_switches}
    explicit = {**explicit, **{n: grid_train.get(n, entry_train.get(n, explicit.get(n)))
                               for n in ("train_lr", "train_batch_size", "train_steps")}}
    return method, hparams, switches, explicit


def train_settings(prepared_dir: Path, entry: str, explicit: dict, set_items: list[str], hparam: list[str],
                   params_file: Path | None, test_domain: str | None, execution: Execution, dry_run: bool = False):
    """The TrainSettings of one `alignclip train`, every check that needs no model made: the method, its switches,
    the settings (method < recipe < params file < explicit) and, unless a dry run, the prepared data's files."""
    from alignclip.config import resolve_train, train_fields
    from alignclip.methods import get_method

    method, hparams, switches, explicit = _cell_values(entry, hparam, set_items, explicit)
    check_workers(execution.num_workers)
    if explicit.get("train_steps") is not None and explicit.get("train_epochs") is not None:
        # else --steps would win and --epochs be dropped without a word
        raise ConfigError(f"--steps {explicit['train_steps']} and --epochs {explicit['train_epochs']}: give one")
    meta = None
    if explicit.get("train_recipe") is None and (prepared_dir / "meta.json").is_file():
        from alignclip.datafiles import META, read_json

        meta = read_json(prepared_dir / "meta.json", META, "the metadata of `alignclip prepare`")
    fields = train_fields(resolve_train(params_file, explicit, meta), test_domain or None, switches, method)
    get_method(method, fields["formulation"], **fields["overrides"])  # an unknown method is refused before torch loads
    if not dry_run:  # a dry run may come before `prepare` (a pipeline's cell)
        check_prepared(prepared_dir)
    from alignclip.train import TrainSettings

    return TrainSettings(method=method, hparams=hparams, test_domain=test_domain or None, num_workers=execution.num_workers,
                         stage_remote=execution.stage_remote, device=execution.device, progress=execution.progress, **fields)


def train_dry_run(prepared_dir: Path, settings) -> str:
    """The real run's checks and resolution (train.resolve, where setup starts): the effective settings as JSON."""
    from dataclasses import asdict

    from alignclip.train import resolve

    if not prepared_dir.exists():  # a pipeline's cell before `prepare`: what needs no data is still checked
        log.warning("%s does not exist yet: the held-out domain is not checked", prepared_dir)
    plan = resolve(prepared_dir if prepared_dir.exists() else None, settings)
    return json.dumps({k: v for k, v in asdict(plan.settings).items() if k not in DRY_RUN_HIDDEN}, sort_keys=True)


def resume_options(out_dir: Path, settings, checkpointing: Checkpointing):
    """Where the resume checkpoint lives: the given folder, else under ALIGNCLIP_CHECKPOINT_ROOT keyed by output path
    and cell (a retried pod finds it), else beside the outputs."""
    from alignclip.config import cell_name
    from alignclip.resume import ResumeOptions, keyed_location

    directory = checkpointing.directory
    if directory is None and os.environ.get("ALIGNCLIP_CHECKPOINT_ROOT"):
        cell_key = f"train-{cell_name(settings.method, settings.hparams)}-{settings.test_domain or 'all'}-s{settings.seed}"
        directory = keyed_location(os.environ["ALIGNCLIP_CHECKPOINT_ROOT"], out_dir, cell_key)
    return ResumeOptions(directory, checkpointing.every, checkpointing.minutes * 60, enabled=checkpointing.resume)


def train(prepared_dir: Path, out_dir: Path, settings, similarity_path: Path | None, experiment: str,
          checkpointing: Checkpointing) -> tuple[str, str | None]:
    """`alignclip train`: one cell's training under its MLflow run (continued when resumed), the model registered;
    returns (the result line, the MLflow view line)."""
    checkpointing.check()
    check_output_dir(out_dir)
    from alignclip import artifacts, runs, tracking
    from alignclip.classifier import log_classifier
    from alignclip.data.prepare import load_prepared
    from alignclip.files import hold_output_lock
    from alignclip.resume import pending_run_id
    from alignclip.train import cell_tags, train as run_train

    hold_output_lock(out_dir)  # one writer per output, taken before its MLflow run: a refused second one leaves no trace
    resume = resume_options(out_dir, settings, checkpointing)
    previous_run = pending_run_id(out_dir, resume)  # a resumed training continues its MLflow run
    manifest, meta = load_prepared(prepared_dir)
    tags = cell_tags(settings, meta)
    note = f"Grid cell: training (params, curves, model) and evaluation (accuracies) of one run. {runs.PERCENT_NOTE}"
    with tracking.start_run(
        experiment, runs.cell_run_name(tags["variant"], settings.test_domain, settings.seed),
        tags={**tags, **runs.data_tags(meta, manifest), "mlflow.note.content": note}, resume_run_id=previous_run,
    ) as tracker:
        tracker.log_input(manifest, f"{meta['dataset']} ({meta['protocol']})", meta["root"], runs.manifest_digest(manifest), "training")
        summary = run_train(prepared_dir, out_dir, settings, tracker, similarity_path, resume=resume)
        tracker.log_artifact(out_dir / artifacts.TRAIN_LOG)
        tracker.log_artifact(out_dir / artifacts.TRAIN_SUMMARY)
        if tracker.enabled and summary["method"]["trains"]:  # zero-shot is not a trained model: nothing to register
            log_classifier(tracker, out_dir / artifacts.MODEL, meta, tags)
    line = f"{settings.method}: {summary.get('steps', 0)} steps -> {out_dir / artifacts.MODEL}"
    return line, tracking.view_line(tracker.parent_run_id, tracker.run_id)
