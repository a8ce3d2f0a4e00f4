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
    from alignclip import artifacts, tracking
    from alignclip.classifier import log_classifier
    from alignclip.data.prepare import load_prepared
    from alignclip.publish import hold_output_lock
    from alignclip.resume import pending_run_id
    from alignclip.train import cell_tags, train as run_train

    hold_output_lock(out_dir)  # one writer per output, taken before its MLflow run: a refused second one leaves no trace
    resume = resume_options(out_dir, settings, checkpointing)
    previous_run = pending_run_id(out_dir, resume)  # a resumed training continues its MLflow run
    manifest, meta = load_prepared(prepared_dir)
    tags = cell_tags(settings, meta)
    note = f"Grid cell: training (params, curves, model) and evaluation (accuracies) of one run. {tracking.PERCENT_NOTE}"
    with tracking.start_run(
        experiment, tracking.cell_run_name(tags["variant"], settings.test_domain, settings.seed),
        tags={**tags, **tracking.data_tags(meta, manifest), "mlflow.note.content": note}, resume_run_id=previous_run,
    ) as tracker:
        tracker.log_input(manifest, f"{meta['dataset']} ({meta['protocol']})", meta["root"], tracking.manifest_digest(manifest), "training")
        summary = run_train(prepared_dir, out_dir, settings, tracker, similarity_path, resume=resume)
        tracker.log_artifact(out_dir / artifacts.TRAIN_LOG)
        tracker.log_artifact(out_dir / artifacts.TRAIN_SUMMARY)
        if tracker.enabled and summary["method"]["trains"]:  # zero-shot is not a trained model: nothing to register
            log_classifier(tracker, out_dir / artifacts.MODEL, meta, tags)
    line = f"{settings.method}: {summary.get('steps', 0)} steps -> {out_dir / artifacts.MODEL}"
    return line, tracking.view_line(tracker.parent_run_id, tracker.run_id)


def similarity(prepared_dir: Path, out_dir: Path, explicit: dict, params_file: Path | None, experiment: str) -> str:
    """`alignclip similarity`: the class similarity matrix (params file < explicit options), logged to the pipeline's
    MLflow run (one per pipeline) or a run of its own; returns the result line."""
    from alignclip.config import resolve_stage

    values = resolve_stage(params_file, explicit)
    model, pretrained, scale = values["model_name"], values["model_pretrained"], values["similarity_scale"]
    check_output_dir(out_dir)
    check_prepared(prepared_dir)
    from alignclip import tracking
    from alignclip.similarity import similarity_stage

    parent = tracking.pipeline_run_id(experiment)
    if parent:  # one per pipeline: the pipeline run's own artifacts
        meta = similarity_stage(prepared_dir, out_dir, model, pretrained, scale, tracking.Tracker(False))
        try:
            for name in ("similarity.png", "similarity.csv"):
                tracking.log_pipeline_artifact(parent, out_dir / name, "similarity")
        except Exception as err:  # noqa: BLE001 - the matrix is on disk; tracking must not cost it
            log.warning("could not log the similarity matrix to MLflow (%s)", str(err).splitlines()[0][:200])
    else:
        with tracking.start_run(experiment, "similarity", tags={"run_type": "similarity"}) as tracker:
            meta = similarity_stage(prepared_dir, out_dir, model, pretrained, scale, tracker)
    return f"similarity of {len(meta['classes'])} classes -> {out_dir}"


def _evaluation_run(checkpoint: Path, experiment: str) -> tuple[str, str | None, str | None]:
    """(run name, pipeline run, run to continue) of an evaluation: the cell's training run (named in train.json) if
    it belongs to this pipeline run; else a new cell run."""
    from alignclip import artifacts, tracking
    from alignclip.datafiles import TRAIN_SUMMARY, read_json

    trained = checkpoint.parent / artifacts.TRAIN_SUMMARY
    info = read_json(trained, TRAIN_SUMMARY, "the summary of `alignclip train`") if trained.is_file() else {}
    parent = tracking.pipeline_run_id(experiment)
    resume = info.get("mlflow_run_id") if tracking.tracking_uri() and tracking.resumable(info.get("mlflow_run_id"), parent) else None
    trained_settings = info.get("settings", {})
    run_name = tracking.cell_run_name(info.get("variant", checkpoint.parent.name), trained_settings.get("test_domain"), trained_settings.get("seed", "?"))
    return run_name, parent, resume


def evaluate(prepared_dir: Path, checkpoint: Path, out_dir: Path, explicit: dict, params_file: Path | None,
             test_domain: str | None, execution: Execution, experiment: str) -> tuple[str, str | None]:
    """`alignclip evaluate`: top-1 accuracy on every view (params file < explicit options), recorded in the cell's
    MLflow run; returns (the metrics line, the MLflow view line)."""
    from alignclip.config import resolve_stage

    values = resolve_stage(params_file, explicit)
    test_split, batch_size = values["data_test_split"], values["evaluate_batch_size"]
    check_workers(execution.num_workers)
    check_output_dir(out_dir)
    check_prepared(prepared_dir)
    if not checkpoint.is_file():  # load_checkpoint's check, before torch loads
        raise ConfigError(f"checkpoint not found: {checkpoint} (the model.pt of `alignclip train`)")
    from alignclip import artifacts, tracking
    from alignclip.data.prepare import load_prepared
    from alignclip.evaluate import evaluate as run_evaluate, flat_metrics
    from alignclip.publish import hold_output_lock

    hold_output_lock(out_dir)  # one writer per output, before the MLflow run it would continue
    run_name, parent, resume = _evaluation_run(checkpoint, experiment)
    with tracking.start_run(experiment, run_name, parent_run_id=parent, resume_run_id=resume) as tracker:
        summary = run_evaluate(prepared_dir, checkpoint, out_dir, test_domain or None, test_split, batch_size,
                               execution.num_workers, execution.device, execution.stage_remote)
        if tracker.enabled and tracker.run_id:
            manifest, meta = load_prepared(prepared_dir)
            tags = tracking.cell_tags(summary["dataset"], summary["protocol"], summary["method"], summary["variant"],
                                  summary["formulation"], summary["test_domain"], summary["seed"], summary.get("hparams"))
            tracker.set_tags({**tags, **tracking.data_tags(meta, manifest), "test_split": summary.get("test_split") or "-"})
            tracker.log_input(manifest, f"{meta['dataset']} ({meta['protocol']})", meta["root"], tracking.manifest_digest(manifest), "evaluation")
            flat = flat_metrics(summary)  # and rounded copies for the runs table's columns (the view below)
            tracker.log_metrics({**flat, **tracking.display_metrics(flat), **{f"{v}_images": r["total"] for v, r in summary["views"].items()}})
            tracker.log_artifact(out_dir / artifacts.METRICS)
            tracker.log_artifact(out_dir / artifacts.PREDICTIONS)
            tracking.describe_model_version(tracker.run_id, summary, tracker.uri)
    return json.dumps(flat_metrics(summary)), tracking.view_line(tracker.parent_run_id, tracker.run_id)


def _check_report_inputs(results_dir: Path, out_dir: Path, prepared_dir: Path | None, similarity_dir: Path | None) -> None:
    from alignclip import artifacts

    check_output_dir(out_dir)
    if not results_dir.is_dir():
        raise ConfigError(f"results folder {results_dir} not found: expected the folder of `alignclip evaluate` outputs")
    # asked-for inputs that are missing stop the report, rather than leaving their figures out without a word
    if prepared_dir is not None and not (prepared_dir / artifacts.META).is_file():
        raise ConfigError(f"--prepared-dir {prepared_dir}: no {artifacts.META} there; expected an `alignclip prepare` output")
    if similarity_dir is not None and not (similarity_dir / artifacts.SIMILARITY_MATRIX).is_file():
        raise ConfigError(f"--similarity-dir {similarity_dir}: no {artifacts.SIMILARITY_MATRIX} there; expected an "
                          "`alignclip similarity` output")


def report(results_dir: Path, out_dir: Path, prepared_dir: Path | None, similarity_dir: Path | None,
           metrics_file: Path | None, params_file: Path | None, experiment: str) -> tuple[str, str | None]:
    """`alignclip report`: tables, figures and the results page, which end the pipeline's MLflow run (or get a run of
    their own); returns (the result line, the MLflow view line)."""
    from alignclip.config import resolve_stage

    resolve_stage(params_file)  # a bad file is refused like any stage's, before any work
    _check_report_inputs(results_dir, out_dir, prepared_dir, similarity_dir)
    from alignclip import artifacts, tracking
    from alignclip.report import build_report, reported_results

    parent = tracking.pipeline_run_id(experiment)
    if parent:  # the last stage: the pipeline run gets the page and the summary metrics, and ends
        try:
            page = build_report(results_dir, out_dir, prepared_dir, similarity_dir)
        except BaseException:
            tracking.mark_failed(parent, "report")
            raise
        try:
            tracking.finish_pipeline_run(parent, reported_results(results_dir), out_dir)
        except Exception as err:  # noqa: BLE001 - the page is on disk; tracking must not cost it
            log.warning("could not end the pipeline's MLflow run %s (%s)", parent, str(err).splitlines()[0][:200])
    else:
        with tracking.start_run(experiment, "report", tags={"run_type": "report"}) as tracker:
            page = build_report(results_dir, out_dir, prepared_dir, similarity_dir)
            tracker.log_artifact(out_dir, "report")
            if tracker.enabled:
                results = reported_results(results_dir)
                tracker.log_metrics({**tracking.summary_metrics(results), **tracking.report_metrics(out_dir)})
                for dataset in sorted(results["dataset"].unique()):
                    tracking.set_best_aliases(dataset, tracker.uri)
    if metrics_file is not None:
        from alignclip.publish import atomic_write_text

        atomic_write_text(metrics_file, (out_dir / artifacts.SCORES).read_text())
    return f"results page: {page}", tracking.view_line(parent, None if parent else tracker.run_id)
