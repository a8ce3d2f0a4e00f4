"""The `alignclip` command line: every stage of the pipeline, one code path for shells, DVC and KFP."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import List, Optional

import typer
import typer.core

from alignclip import __version__
from alignclip.config import BY_NAME, COMPOSITES, ConfigError, check_output_dir
from alignclip.methods import DEFAULT_METHOD
from alignclip.log import get_logger, setup_logging
from alignclip.stages import DRY_RUN_HIDDEN, check_prepared as _check_prepared, check_workers as _check_workers  # noqa: F401

# Import cost: this module and what it imports at the top (config, log, typer) load in a fraction of a second, so
# `--help` and a refused value answer at once. torch, open_clip, mlflow, pandas, kfp, matplotlib are imported inside
# the commands, after their checks (tests/test_cli.py::test_help_and_refusals_import_no_heavy_library).


def _wrap_without_breaking_names() -> None:
    # click's text wrapper breaks lines after any hyphen (`--num-` / `workers`, `alignclip-` / `pipeline.yaml`):
    # a name must stay whole to be found and copied, so lines break at spaces only
    from typer._click import _textwrap

    class Wrapper(_textwrap.TextWrapper):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "break_on_hyphens": False})

    _textwrap.TextWrapper = Wrapper


_wrap_without_breaking_names()


class _WholeSummary:
    def get_short_help_str(self, limit: int = 45) -> str:
        # a command's line in its group's list: its docstring's first paragraph, wrapped, not cut at the column's
        # width (nor at the first ". ", which may be "fig. 6")
        if self.short_help or not self.help:
            return super().get_short_help_str(limit)
        return " ".join(inspect.cleandoc(self.help).split("\n\n")[0].split())


class _Group(_WholeSummary, typer.core.TyperGroup):
    pass


class _Command(_WholeSummary, typer.core.TyperCommand):
    """Positionals by name in the usage line, as click writes them (``train [OPTIONS] PREPARED_DIR OUT_DIR``),
    not typer's ``{prepared_dir} {out_dir}``, which reads like a format string."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.param_type_name == "argument" and param.metavar is None:
                param.metavar = param.name.upper()  # the same name in the usage line, the list and error messages

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                pieces.extend(param.get_usage_pieces(ctx))
                continue
            name = param.metavar + ("..." if param.nargs != 1 else "")
            pieces.append(name if param.required else f"[{name}]")
        return pieces


def _show_bad_parameter(self, file=None) -> None:
    """A value the parser refuses (``--steps abc``, a missing argument) is the project's one ``error:`` line, exit 2,
    as every other bad value, not click's usage block."""
    command = self.ctx.command_path if self.ctx is not None else "alignclip"
    typer.secho(f"error: {self.format_message()} (see '{command} --help')", fg=typer.colors.RED, err=True)


# typer parses with its own copy of click (typer._click); its BadParameter covers bad and missing values
typer._click.exceptions.BadParameter.show = _show_bad_parameter  # exit code stays 2


class _Typer(typer.Typer):
    """Plain (click) help layout: rich's table cuts long option and variable names at 80 columns (a pipe, a CI
    log: ``--checkpoint-minu…``) and shows ``<bool>`` as the type of every flag; click's wraps the text instead."""

    def __init__(self, **kwargs):
        kwargs.setdefault("rich_markup_mode", None)
        kwargs.setdefault("cls", _Group)
        super().__init__(**kwargs)

    def command(self, name=None, *, cls=None, **kwargs):
        return super().command(name, cls=cls or _Command, **kwargs)


app = _Typer(
    help="AlignCLIP: fine-tune CLIP's image encoder with attention alignment, semantic label smoothing and BMA.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = _Typer(help="Build the embedded datasets.", no_args_is_help=True)
pipeline_app = _Typer(help="Compile, submit or run the Kubeflow pipelines.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(pipeline_app, name="pipeline")
tracking_app = _Typer(help="MLflow records kept on disk while the tracking server was unreachable.", no_args_is_help=True)
app.add_typer(tracking_app, name="tracking")
log = get_logger("alignclip")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@app.callback()
def _main(
    log_level: str = typer.Option("INFO", "--log-level", envvar="ALIGNCLIP_LOG_LEVEL", help="DEBUG, INFO, WARNING, ERROR"),
):
    if log_level.upper() not in LOG_LEVELS:
        raise ConfigError(f"--log-level {log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
    setup_logging(log_level)


def _schema_help(name: str, text: str | None = None) -> str:
    """An option's help from the schema (alignclip/config.py), its default named there and nowhere else."""
    setting = BY_NAME[name]
    default = setting.default if setting.default is not None else "not set"
    return f"{text or setting.help} (default: {default}; params file {setting.key})"


@app.command()
def version():
    """Print the package version."""
    typer.echo(__version__)


@data_app.command("digits")
def data_digits(
    out_dir: Path = typer.Argument(..., help="folder to write <domain>/<class>/<file>.png into"),
    size: int = typer.Option(32, help="side of the upsampled images in pixels"),
    force: bool = typer.Option(False, help="replace the contents of a non-empty folder that is not a RotatedDigits build"),
):
    """Write RotatedDigits (scikit-learn's digits, six rotated domains) in DomainBed's folder layout."""
    from alignclip.data.digits import build_rotated_digits

    summary = build_rotated_digits(out_dir, size=size, force=force)
    typer.echo(f"RotatedDigits: {summary['total']} images in {len(summary['domains'])} domains -> {out_dir}")


@app.command()
def pretrain(
    out_dir: Path = typer.Argument(..., help="where to write alignclip-tiny-digits.pt, its summary (JSON) and training log"),
    rebuild: bool = typer.Option(False, help="build afresh even when the cache holds these weights"),
):
    """Pre-train the tiny preset's CLIP contrastively on printed digits (deterministic; cached), its default weights."""
    check_output_dir(out_dir)
    from alignclip.pretrain import WEIGHTS_NAME, export

    # No MLflow run of its own: the weights' summary (settings, loss, accuracy, sha256) sits beside them, and the
    # runs that use them record `pretrained` as a parameter.
    summary = export(out_dir, rebuild=rebuild)
    typer.echo(
        f"tiny CLIP pre-trained on printed digits: zero-shot {summary['source_val_zero_shot_acc']:.1f}% on the source's "
        f"validation set, sha256 {summary['sha256'][:16]}... -> {out_dir / (WEIGHTS_NAME + '.pt')}"
    )


@app.command()
def prepare(
    dataset: str = typer.Argument(..., help="dataset name, e.g. rotated_digits, pacs, office_home, oxford_pets, imagenet; or domainbed (any DomainBed-layout folder, with --name)"),
    root: str = typer.Argument(..., help="dataset folder or s3:// prefix"),
    out_dir: Path = typer.Argument(..., help="where to write manifest.parquet and meta.json"),
    protocol: Optional[str] = typer.Option(None, help=_schema_help("data_protocol")),
    holdout_fraction: Optional[float] = typer.Option(None, help=_schema_help("data_holdout_fraction")),
    trial_seed: Optional[int] = typer.Option(None, help=_schema_help("data_trial_seed")),
    shots: Optional[int] = typer.Option(None, help=_schema_help("data_shots")),
    seeds: Optional[List[int]] = typer.Option(None, "--seed", help=_schema_help("data_sample_seeds", "few-shot sampling seeds (repeatable; not set: train.seeds)")),
    params_file: Optional[Path] = typer.Option(None, help="settings file (params.yaml) for the options not given here"),
    template: Optional[str] = typer.Option(None, help="prompt template with {} for the class name"),
    split_file: Optional[str] = typer.Option(None, help="CoOp split JSON (default: the dataset's split_zhou_*.json)"),
    templates: Optional[str] = typer.Option(None, help=_schema_help("data_templates")),
    class_names: Optional[str] = typer.Option(None, help=_schema_help("data_class_names")),
    listing: Optional[str] = typer.Option(None, help=_schema_help("data_listing")),
    validate: bool = typer.Option(False, help="also decode every image (parallel) and list unreadable ones"),
    name: Optional[str] = typer.Option(None, help="your dataset's name in results; needed with a layout kind (domainbed)"),
):
    """List and split a dataset by its protocol; write a manifest (parquet) and its metadata (JSON)."""
    from alignclip import stages

    explicit = {"data_protocol": protocol, "data_holdout_fraction": holdout_fraction, "data_trial_seed": trial_seed,
                "data_shots": shots, "data_sample_seeds": list(seeds) if seeds else None, "data_templates": templates,
                "data_class_names": class_names, "data_listing": listing}
    typer.echo(stages.prepare(dataset, root, out_dir, explicit, params_file, template, split_file, name, validate))


@app.command()
def similarity(
    prepared_dir: Path = typer.Argument(..., help="output of `alignclip prepare`"),
    out_dir: Path = typer.Argument(..., help="where to write similarity.pt, similarity.csv and similarity.png"),
    model: Optional[str] = typer.Option(None, help=_schema_help("model_name")),
    pretrained: Optional[str] = typer.Option(None, help=_schema_help("model_pretrained")),
    scale: Optional[float] = typer.Option(None, help=_schema_help("similarity_scale")),
    params_file: Optional[Path] = typer.Option(None, help="settings file (params.yaml) for the options not given here"),
    experiment: str = typer.Option("alignclip", envvar="ALIGNCLIP_EXPERIMENT", help="MLflow experiment"),
):
    """Class similarity matrix of the class prompts (appendix B.5), with its heatmap (fig. 6)."""
    from alignclip import stages

    explicit = {"model_name": model, "model_pretrained": pretrained, "similarity_scale": scale}
    typer.echo(stages.similarity(prepared_dir, out_dir, explicit, params_file, experiment))


WORKERS_HELP = ("DataLoader worker processes, or auto: the CPUs this process may use (affinity, cgroup quota) less "
                "one, none with two CPUs or fewer")
DEVICE_HELP = "auto (the GPU if there is one, else the CPU), cpu, cuda or cuda:N"
STAGE_HELP = "copy s3:// images into the local cache (ALIGNCLIP_CACHE) first, with parallel GETs; else one GET per image"


@app.command()
def train(
    prepared_dir: Path = typer.Argument(..., help="output of `alignclip prepare`"),
    out_dir: Path = typer.Argument(..., help="where to write model.pt, train_log.csv, train.json"),
    method: str = typer.Option(DEFAULT_METHOD, help="zeroshot | erm | clipood | alignclip, optionally +paper or +release"),
    formulation: Optional[str] = typer.Option(None, help="paper (default) | release (the authors' released code)"),
    set_: List[str] = typer.Option([], "--set", help="method switch override key=value (repeatable), e.g. aal=false"),
    hparam: List[str] = typer.Option([], "--hparam", help="a selection grid cell's setting key=value (repeatable): lr, batch_size, steps or a method switch; applied and recorded as the cell's hparams"),
    recipe: Optional[str] = typer.Option(None, help="named recipe (`alignclip recipes`); default: the benchmark's for the prepared dataset, else paper"),
    model: Optional[str] = typer.Option(None, help="model preset or open_clip architecture (default: tiny)"),
    pretrained: Optional[str] = typer.Option(None, help="weights: tag, file, s3:// URI, none, or the preset's default"),
    test_domain: Optional[str] = typer.Option(None, help="held-out domain (domainbed, wild)"),
    seed: Optional[int] = typer.Option(None, help=_schema_help("train_seed")),
    steps: Optional[int] = typer.Option(None, help="optimiser steps (default: the recipe's)"),
    epochs: Optional[int] = typer.Option(None, help="passes over the training set instead of steps (default: the recipe's)"),
    batch_size: Optional[int] = typer.Option(None, help="batch per training domain (default: the recipe's)"),
    lr: Optional[float] = typer.Option(None, help="learning rate (default: the recipe's)"),
    weight_decay: Optional[float] = typer.Option(None, help=_schema_help("train_weight_decay")),
    hflip: Optional[bool] = typer.Option(None, "--hflip/--no-hflip", help="random horizontal flip (default: the recipe's)"),
    params_file: Optional[Path] = typer.Option(None, help="settings file (params.yaml) for what is not given here"),
    similarity_path: Optional[Path] = typer.Option(None, "--similarity", help="similarity.pt from `alignclip similarity`"),
    num_workers: str = typer.Option("auto", help=WORKERS_HELP),
    stage_remote: bool = typer.Option(True, help=STAGE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    progress: bool = typer.Option(True, help="show a progress bar"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the effective settings (JSON) and stop"),
    experiment: str = typer.Option("alignclip", envvar="ALIGNCLIP_EXPERIMENT", help="MLflow experiment"),
    checkpoint_dir: Optional[str] = typer.Option(
        None, envvar="ALIGNCLIP_CHECKPOINT_DIR",
        help="folder or s3:// prefix for the resume checkpoint (default: under ALIGNCLIP_CHECKPOINT_ROOT keyed by "
        "output path and cell if set, else .<out_dir>.train.resume beside the outputs)",
    ),
    checkpoint_every: int = typer.Option(0, help="also write a resume checkpoint every N steps (0: by time only)"),
    checkpoint_minutes: float = typer.Option(10.0, help="write a resume checkpoint at least this often (0: by steps only)"),
    resume: bool = typer.Option(True, help="continue from a resume checkpoint of the same settings if there is one"),
):
    """Fine-tune the image encoder with one method; the BMA model is the result. Killed or preempted, the same
    command resumes where it stopped (SIGTERM writes a checkpoint first)."""
    from alignclip import stages

    checkpointing = stages.Checkpointing(checkpoint_dir, checkpoint_every, checkpoint_minutes, resume).check()
    explicit = {"model_name": model, "model_pretrained": pretrained, "train_recipe": recipe, "train_formulation": formulation,
                "train_steps": steps, "train_epochs": epochs, "train_batch_size": batch_size, "train_lr": lr, "train_hflip": hflip,
                "train_seed": seed, "train_weight_decay": weight_decay}
    execution = stages.Execution(num_workers, stage_remote, device, progress)
    settings = stages.train_settings(prepared_dir, method, explicit, set_, hparam, params_file, test_domain, execution, dry_run)
    if dry_run:
        typer.echo(stages.train_dry_run(prepared_dir, settings))
        return
    line, view = stages.train(prepared_dir, out_dir, settings, similarity_path, experiment, checkpointing)
    typer.echo(line)
    _echo_view(view)


@app.command()
def evaluate(
    prepared_dir: Path = typer.Argument(..., help="output of `alignclip prepare`"),
    checkpoint: Path = typer.Argument(..., help="model.pt from `alignclip train`"),
    out_dir: Path = typer.Argument(..., help="where to write metrics.json and predictions.parquet"),
    test_domain: Optional[str] = typer.Option(None, help="held-out domain: read from the checkpoint; if given, it must agree"),
    test_split: Optional[str] = typer.Option(None, help=_schema_help("data_test_split")),
    batch_size: Optional[int] = typer.Option(None, help=_schema_help("evaluate_batch_size")),
    num_workers: str = typer.Option("auto", help=WORKERS_HELP),
    stage_remote: bool = typer.Option(True, help=STAGE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    experiment: str = typer.Option("alignclip", envvar="ALIGNCLIP_EXPERIMENT", help="MLflow experiment"),
    params_file: Optional[Path] = typer.Option(None, help="settings file (params.yaml) for the options not given here"),
):
    """Top-1 accuracy on every view of the protocol (held-out domain, base/new classes, ImageNet variants)."""
    from alignclip import stages

    explicit = {"data_test_split": test_split, "evaluate_batch_size": batch_size}
    execution = stages.Execution(num_workers, stage_remote, device, progress=False)
    line, view = stages.evaluate(prepared_dir, checkpoint, out_dir, explicit, params_file, test_domain, execution, experiment)
    typer.echo(line)
    _echo_view(view)


@app.command()
def report(
    results_dir: Path = typer.Argument(..., help="folder holding evaluation outputs (metrics.json files, any depth)"),
    out_dir: Path = typer.Argument(..., help="where to write tables, figures and the results page"),
    prepared_dir: Optional[Path] = typer.Option(None, help="prepared dataset, for attention-map figures"),
    similarity_dir: Optional[Path] = typer.Option(None, help="`alignclip similarity` output to include"),
    metrics_file: Optional[Path] = typer.Option(None, help="also write the report's scores.json (means, stds, "
                                                "intervals) here, outside the report folder: DVC's metrics file"),
    experiment: str = typer.Option("alignclip", envvar="ALIGNCLIP_EXPERIMENT", help="MLflow experiment"),
    params_file: Optional[Path] = typer.Option(None, help="settings file (params.yaml), checked like every stage's; the report reads what the results record"),
):
    """Results tables beside the paper's numbers (CSV, Markdown), figures (PNG) and a results page."""
    from alignclip import stages

    line, view = stages.report(results_dir, out_dir, prepared_dir, similarity_dir, metrics_file, params_file, experiment)
    typer.echo(line)
    _echo_view(view)


def _echo_view(line: str | None) -> None:
    """The MLflow link of a stage's runs, on stderr (stdout stays what scripts read)."""
    if line:
        typer.echo(line, err=True)


@app.command("grid")
def grid_cells(
    prepared_dir: Path = typer.Argument(..., help="output of `alignclip prepare`"),
    out_dir: Path = typer.Argument(..., help="where each cell's folder goes (<cell>-<domain>-s<seed>: train and evaluate outputs)"),
    params_file: Path = typer.Option(Path("params.yaml"), help="settings file: train.methods x train.grid x train.test_domains x train.seeds are the cells"),
    test_domain: List[str] = typer.Option([], help="only the cells of this held-out domain (repeatable; default: all)"),
    seed: List[int] = typer.Option([], "--seed", help="only the cells of this seed (repeatable; default: all)"),
    part: str = typer.Option("all", help="all | zeroshot (once per held-out domain) | trained"),
    similarity_path: Optional[Path] = typer.Option(None, "--similarity", help="similarity.pt from `alignclip similarity`"),
    jobs: str = typer.Option("auto", help="cells at a time, one process each (auto: one per CPU)"),
    scores: Optional[Path] = typer.Option(None, help="also write every cell's accuracies here (JSON, a DVC metrics file)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print each cell's effective settings (train --dry-run) and stop"),
):
    """Train and evaluate the cells of the grid: each runs `alignclip train` and `alignclip evaluate` with the
    arguments of a KFP cell, in this process (one worker per core), so a cell costs no process start-up."""
    from alignclip.cells import cell_commands, run_cells, select_cells
    from alignclip.config import resolve

    values = resolve(None, params_file)
    cells = select_cells(values, test_domain or None, seed or None, part)
    if dry_run:
        for cell in cells:
            _run_here(cell_commands(values, str(prepared_dir), str(out_dir), cell, similarity_path and str(similarity_path))[0] + ["--dry-run"])
        return
    check_output_dir(out_dir)
    done = run_cells(values, str(prepared_dir), out_dir, cells, _run_here, similarity_path and str(similarity_path), jobs, scores)
    typer.echo(f"{len(done)} grid cell(s) -> {out_dir}")


def _run_here(argv: list[str]) -> None:
    """One `alignclip` command in this process (the CLI's own parsing and checks); errors propagate (grid cells)."""
    app(argv, standalone_mode=False, prog_name="alignclip")


def _warn_local_root(values: dict) -> None:
    from alignclip_kfp.client import local_data_root

    root = local_data_root(values)
    if root:
        log.warning("data.root %r is a path on this machine, which the cluster's pods do not have: pass --data-root "
                    "s3://BUCKET/PREFIX (or --data-root embedded for the demo's RotatedDigits)", root)


FAMILY_HELP = "demo | domain_shift | imagenet | base2new | wild | backbones_<model>_<protocol> | all | backbones"
PARAM_HELP = "setting KEY=VALUE (repeatable; `alignclip config show` lists them): train_steps=500, train_methods=erm,alignclip"
DATASET_HELP = "dataset (registry name): its protocol's recipe and every held-out domain follow unless set"


def _settings(family: str, dataset: Optional[str], data_root: Optional[str], param: list[str], params_file: Optional[Path]) -> dict:
    """Resolved settings of a pipeline command: family < params file < --dataset/--data-root < --param."""
    from alignclip.config import parse_assignments
    from alignclip_kfp.arguments import resolve_pipeline

    overrides = {}
    if dataset is not None:
        overrides["data_dataset"] = dataset
    if data_root is not None:
        overrides["data_root"] = data_root
    overrides.update(parse_assignments(param))
    return resolve_pipeline(family, params_file, overrides)


def _cluster(gpu_type, gpus, node_selector, toleration, retries, cpu, memory, image, max_parallelism):
    from alignclip_kfp.client import cluster_settings

    return cluster_settings(gpu_type, gpus, node_selector or None, toleration or None, retries, cpu, memory, image, max_parallelism)


# options shared by compile, submit and run (one definition, so the three accept the same settings)
OPT_DATASET = typer.Option(None, "--dataset", help=DATASET_HELP)
OPT_DATA_ROOT = typer.Option(None, "--data-root", help="dataset folder or s3:// prefix (data_root)")
OPT_PARAM = typer.Option([], "--param", help=PARAM_HELP)
OPT_PARAMS_FILE = typer.Option(None, "--params-file", help="settings file (params.yaml layout, any subset); beats the family's defaults")
OPT_GPU_TYPE = typer.Option("nvidia.com/gpu", "--accelerator", "--gpu-type", help="accelerator resource of train/evaluate tasks")
OPT_GPUS = typer.Option(1, help="accelerators per train/evaluate task (0: none, and no default GPU node selector or toleration)")
OPT_NODE_SELECTOR = typer.Option([], help="LABEL=VALUE for GPU tasks (repeatable; default none: the GPU resource request places them)")
OPT_TOLERATION = typer.Option([], help="KEY[=VALUE][:EFFECT] for GPU tasks (repeatable; default nvidia.com/gpu:NoSchedule, none with --gpus 0)")
OPT_CPU = typer.Option(None, help="CPU request and limit of train/evaluate tasks (default 16; the limit sizes --num-workers auto)")
OPT_MEMORY = typer.Option(None, help="memory request and limit of train/evaluate tasks (default 32G); half of it is their memory-backed /dev/shm, which counts against it")
OPT_IMAGE = typer.Option(None, envvar="ALIGNCLIP_IMAGE", help="image of every task (default: ghcr.io/alignclip/alignclip:<version>, a placeholder)")
OPT_PARALLELISM = typer.Option(None, "--max-parallelism", help="GPU pods (grid cells) at once, for all or backbones as a whole (default 8)")
OPT_RETRIES = typer.Option(2, help="retries of each train and evaluate task (a preempted pod)")


@pipeline_app.command("compile")
def pipeline_compile(
    family: str = typer.Argument("demo", help=FAMILY_HELP),
    output: Path = typer.Option(Path("alignclip-pipeline.yaml"), "--output", "-o", help="YAML package to write"),
    dataset: Optional[str] = OPT_DATASET,
    data_root: Optional[str] = OPT_DATA_ROOT,
    param: List[str] = OPT_PARAM,
    params_file: Optional[Path] = OPT_PARAMS_FILE,
    gpu_type: str = OPT_GPU_TYPE,
    gpus: int = OPT_GPUS,
    node_selector: List[str] = OPT_NODE_SELECTOR,
    toleration: List[str] = OPT_TOLERATION,
    cpu: Optional[str] = OPT_CPU,
    memory: Optional[str] = OPT_MEMORY,
    image: Optional[str] = OPT_IMAGE,
    max_parallelism: Optional[int] = OPT_PARALLELISM,
    retries: int = OPT_RETRIES,
    force: bool = typer.Option(False, help="replace an existing output file"),
):
    """Compile a pipeline to a KFP YAML package; its parameter defaults are the resolved settings."""
    from alignclip_kfp.client import compile_pipeline, is_placeholder_image

    values = _settings(family, dataset, data_root, param, params_file)
    cluster = _cluster(gpu_type, gpus, node_selector, toleration, retries, cpu, memory, image, max_parallelism)
    if output.is_dir():  # --force would not help: the package is one file
        raise ConfigError(f"-o {output}: a directory; expected a .yaml file path")
    if output.exists() and not force:
        raise ConfigError(f"{output} exists; pass --force to replace it")
    check_output_dir(output.parent if str(output.parent) else Path("."), f"-o {output}: folder")
    if is_placeholder_image(cluster):
        log.warning("image %s is the built-in placeholder: pass --image REGISTRY/alignclip:TAG (the image you pushed) "
                    "or set ALIGNCLIP_IMAGE, or the cluster cannot pull it", cluster.image)
    _warn_local_root(values)
    output.parent.mkdir(parents=True, exist_ok=True)  # as every other output of the CLI: missing folders are created
    path = compile_pipeline(family, output, cluster, values)
    typer.echo(f"compiled {family} -> {path}")


@pipeline_app.command("submit")
def pipeline_submit(
    family: str = typer.Argument("demo", help=FAMILY_HELP),
    host: Optional[str] = typer.Option(None, envvar="KFP_HOST", help="KFP API endpoint, e.g. http://localhost:8080"),
    experiment: Optional[str] = typer.Option(None, help="KFP experiment (default: the family's)"),
    run_name: Optional[str] = typer.Option(None, help="run name"),
    dataset: Optional[str] = OPT_DATASET,
    data_root: Optional[str] = OPT_DATA_ROOT,
    param: List[str] = OPT_PARAM,
    params_file: Optional[Path] = OPT_PARAMS_FILE,
    gpu_type: str = OPT_GPU_TYPE,
    gpus: int = OPT_GPUS,
    node_selector: List[str] = OPT_NODE_SELECTOR,
    toleration: List[str] = OPT_TOLERATION,
    cpu: Optional[str] = OPT_CPU,
    memory: Optional[str] = OPT_MEMORY,
    image: Optional[str] = OPT_IMAGE,
    max_parallelism: Optional[int] = OPT_PARALLELISM,
    retries: int = OPT_RETRIES,
    dry_run: bool = typer.Option(False, "--dry-run", help="print the effective parameters of every task and stop"),
    wait: bool = typer.Option(False, "--wait", help="follow the run: print each task's state as it changes until the run ends; exit 0 if it succeeded, 1 if not"),
):
    """Submit a run to a Kubeflow Pipelines cluster and print its URL (and its MLflow view's)."""
    from alignclip_kfp.client import dry_run as plan, is_placeholder_image, submit

    values = _settings(family, dataset, data_root, param, params_file)
    cluster = _cluster(gpu_type, gpus, node_selector, toleration, retries, cpu, memory, image, max_parallelism)
    if dry_run:
        _warn_local_root(values)
        typer.echo(plan(family, values))
        return
    if not host:
        raise ConfigError("--host (or KFP_HOST) is required: the KFP API endpoint, e.g. http://localhost:8080")
    if is_placeholder_image(cluster):
        raise ConfigError(f"image {cluster.image} is the built-in placeholder, which no cluster can pull: pass "
                          "--image REGISTRY/alignclip:TAG (the image you built and pushed) or set ALIGNCLIP_IMAGE")
    _warn_local_root(values)
    code = submit(family, host, experiment, run_name, values, cluster, wait=wait, echo=typer.echo)
    if code:
        raise typer.Exit(code)


@pipeline_app.command("run")
def pipeline_run(
    family: str = typer.Argument("demo", help=FAMILY_HELP),
    pipeline_root: Path = typer.Option(Path("outputs/kfp"), help="where the local runner keeps artifacts"),
    dataset: Optional[str] = OPT_DATASET,
    data_root: Optional[str] = OPT_DATA_ROOT,
    param: List[str] = OPT_PARAM,
    params_file: Optional[Path] = OPT_PARAMS_FILE,
    dry_run: bool = typer.Option(False, "--dry-run", help="print the effective parameters of every task and stop"),
):
    """Run the real DAG locally: every component as a subprocess of this machine (kfp's SubprocessRunner);
    `alignclip pipeline submit` runs it on a cluster."""
    from alignclip_kfp.client import dry_run as plan, run_local

    if family in COMPOSITES:
        raise ConfigError(f"the {family} pipeline runs on a cluster only; run one of its families locally: "
                          f"{', '.join(COMPOSITES[family].families)}")
    values = _settings(family, dataset, data_root, param, params_file)
    if dry_run:
        typer.echo(plan(family, values))
        return
    check_output_dir(pipeline_root, "--pipeline-root")
    run_local(family, pipeline_root.resolve(), values)
    typer.echo(f"pipeline {family} finished; artifacts under {pipeline_root}")


@tracking_app.command("sync")
def tracking_sync(
    uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help="only records for this tracking URI (default: all)"),
):
    """Send the spooled records (ALIGNCLIP_TRACKING_SPOOL) to their MLflow server; each file goes once it is through."""
    from alignclip.tracking import pending_spools, spool_dir, sync

    pending = pending_spools(uri)
    if not pending:
        typer.echo(f"nothing to replay in {spool_dir()}")
        return
    done = sync(uri)
    typer.echo(f"replayed {len(done)} of {len(pending)} spooled run(s) from {spool_dir()}")


config_app = _Typer(help="The settings schema: `config show` prints resolved settings as a params file (redirect it to write one).", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    family: Optional[str] = typer.Argument(None, help="start from a family's defaults (none: the schema's own, no family's): " + FAMILY_HELP.replace(" | all | backbones", "")),
    dataset: Optional[str] = OPT_DATASET,
    data_root: Optional[str] = OPT_DATA_ROOT,
    param: List[str] = OPT_PARAM,
    params_file: Optional[Path] = OPT_PARAMS_FILE,
):
    """Print the resolved settings as a params file (what DVC and the pipelines would run with).

    Without FAMILY: the schema's own defaults (rotated_digits, tiny preset, paper recipe), which families and params files override; `config show demo` is the embedded demo (params.yaml)."""
    from alignclip.config import parse_assignments, render_params, resolve

    overrides = {k: v for k, v in {"data_dataset": dataset, "data_root": data_root}.items() if v is not None}
    overrides.update(parse_assignments(param))
    typer.echo(render_params(resolve(family, params_file, overrides)), nl=False)


@app.command()
def recipes():
    """List the named hyper-parameter recipes and their sources."""
    from alignclip.recipes import RECIPES

    for name, recipe in RECIPES.items():
        typer.echo(f"{name:32s} {recipe.describe()}")


def _preempted(err: BaseException) -> bool:
    # alignclip.resume imports torch: a command that never loaded it cannot have raised its Preempted
    resume = sys.modules.get("alignclip.resume")
    return resume is not None and isinstance(err, resume.Preempted)


def main() -> None:
    from alignclip import determinism

    try:
        # CPU runs: the portable kernels' environment, set before anything imports torch (alignclip.resume does)
        determinism.pin_for_command(sys.argv[1:])
    except ValueError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    try:
        app()
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, PermissionError) as err:
        # Bad input: one readable line naming what is wrong, no traceback (use --log-level DEBUG for one).
        get_logger("alignclip").debug("error", exc_info=True)
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except OSError as err:
        from alignclip.paths import DiskFull

        if not isinstance(err, DiskFull):
            raise
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)  # names the file and the bytes being written
        sys.exit(2)
    except BaseException as err:  # Preempted is a BaseException, none of the above
        if not _preempted(err):
            raise
        typer.secho(f"stopped: {err}", fg=typer.colors.YELLOW, err=True)
        sys.exit(143)  # 128 + SIGTERM, what the orchestrator expects of a terminated task


if __name__ == "__main__":
    main()
