"""The `alignclip` command line: every stage of the pipeline, one code path for shells, DVC and KFP."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from alignclip import __version__
from alignclip.log import get_logger, setup_logging

app = typer.Typer(
    help="AlignCLIP: fine-tune CLIP's image encoder with attention alignment, semantic label smoothing and BMA.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Build the embedded datasets.", no_args_is_help=True)
pipeline_app = typer.Typer(help="Compile, submit or run the Kubeflow pipelines.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(pipeline_app, name="pipeline")
log = get_logger("alignclip")


@app.callback()
def _main(
    log_level: str = typer.Option("INFO", "--log-level", envvar="ALIGNCLIP_LOG_LEVEL", help="DEBUG, INFO, WARNING, ERROR"),
):
    setup_logging(log_level)


def _parse_overrides(items: list[str]) -> dict:
    """``key=value`` pairs; values are parsed as JSON when they can be (numbers, true/false, null)."""
    overrides = {}
    for item in items or []:
        if "=" not in item:
            raise typer.BadParameter(f"{item!r}: expected key=value")
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


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
    experiment: str = typer.Option("alignclip", envvar="ALIGNCLIP_EXPERIMENT", help="MLflow experiment"),
):
    """Pre-train the tiny preset's CLIP contrastively on printed digits (deterministic; cached), its default weights."""
    from alignclip import tracking
    from alignclip.pretrain import WEIGHTS_NAME, export

    with tracking.start_run(experiment, "pretrain-tiny-digits", tags={"stage": "pretrain"}) as tracker:
        summary = export(out_dir, rebuild=rebuild)
        tracker.log_params({"pretrain": summary["settings"], "digest": summary["digest"]})
        tracker.log_metrics({"source_val_zero_shot_acc": summary["source_val_zero_shot_acc"], "final_loss": summary["final_loss"]})
        tracker.log_artifact(out_dir / f"{WEIGHTS_NAME}.json")
        tracker.log_artifact(out_dir / "pretrain_log.csv")
    typer.echo(
        f"tiny CLIP pre-trained on printed digits: zero-shot {summary['source_val_zero_shot_acc']:.1f}% on the source's "
        f"validation set, sha256 {summary['sha256'][:16]}... -> {out_dir / (WEIGHTS_NAME + '.pt')}"
    )


@app.command()
def prepare(
    dataset: str = typer.Argument(..., help="dataset name, e.g. rotated_digits, pacs, office_home, oxford_pets, imagenet"),
    root: str = typer.Argument(..., help="dataset folder or s3:// prefix"),
    out_dir: Path = typer.Argument(..., help="where to write manifest.parquet and meta.json"),
    protocol: str = typer.Option("", help="domainbed | wild | base2new | imagenet (default: the dataset's own)"),
    holdout_fraction: float = typer.Option(0.2, help="DomainBed held-out fraction per domain"),
    trial_seed: int = typer.Option(0, help="DomainBed trial seed of the in/out splits"),
    shots: int = typer.Option(16, help="few-shot images per class (base2new, imagenet)"),
    seeds: List[int] = typer.Option([1, 2, 3], "--seed", help="few-shot sampling seeds (repeatable)"),
    template: Optional[str] = typer.Option(None, help="prompt template with {} for the class name"),
    split_file: Optional[str] = typer.Option(None, help="CoOp split JSON (default: the dataset's split_zhou_*.json)"),
    validate: bool = typer.Option(False, help="also decode every image (parallel) and list unreadable ones"),
):
    """List and split a dataset by its protocol; write a manifest (parquet) and its metadata (JSON)."""
    from alignclip.data.prepare import PrepareSettings, prepare as run_prepare, validate_images, write_prepared

    settings = PrepareSettings(
        dataset, root, protocol, holdout_fraction, trial_seed, shots, list(seeds), template, split_file
    )
    manifest, meta = run_prepare(settings)
    if validate:
        bad = validate_images(manifest, meta)
        meta["unreadable_images"] = [{"path": p, "error": e} for p, e in bad]
        if bad:
            log.warning("%d unreadable image(s), listed in meta.json; training and evaluation will skip them", len(bad))
    write_prepared(manifest, meta, out_dir)
    typer.echo(f"{meta['dataset']} ({meta['protocol']}): {len(manifest)} images, {len(meta['classes'])} classes -> {out_dir}")


@app.command()
def similarity(
    prepared_dir: Path = typer.Argument(..., help="output of `alignclip prepare`"),
    out_dir: Path = typer.Argument(..., help="where to write similarity.pt, similarity.csv and similarity.png"),
    model: str = typer.Option("tiny", help="model preset or open_clip architecture"),
    pretrained: str = typer.Option("default", help="weights: tag, file, s3:// URI, none, or the preset's default"),
    scale: float = typer.Option(1.0, help="softmax scale of the heatmap (paper 1, released code 35)"),
    experiment: str = typer.Option("alignclip", envvar="ALIGNCLIP_EXPERIMENT", help="MLflow experiment"),
):
    """Class similarity matrix of the class prompts (appendix B.5), with its heatmap (fig. 6)."""
    import pandas as pd

    from alignclip import tracking
    from alignclip.data.prepare import load_prepared
    from alignclip.presets import load_clip
    from alignclip.report import plot_similarity
    from alignclip.similarity import cosine_matrix, save_similarity
    from alignclip.train import encode_classes

    _, meta = load_prepared(prepared_dir)
    bundle = load_clip(model, pretrained)
    text = encode_classes(bundle.model, bundle.tokenizer, meta["classes"], meta["template"], "cpu")
    cosine = cosine_matrix(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_similarity(out_dir / "similarity.pt", cosine, meta["classes"], bundle.architecture, bundle.pretrained)
    soft = (scale * cosine).softmax(dim=-1)
    pd.DataFrame(soft.numpy(), index=meta["classes"], columns=meta["classes"]).to_csv(out_dir / "similarity.csv")
    plot_similarity(soft.numpy(), meta["classes"], out_dir / "similarity.png", meta=meta, cosine=cosine.numpy(),
                    provenance={"model": bundle.architecture, "pretrained": bundle.pretrained, "scale": scale})
    with tracking.start_run(experiment, "similarity", tags={"stage": "similarity"}) as tracker:
        tracker.log_params({"model": model, "pretrained": pretrained, "classes": len(meta["classes"]), "scale": scale})
        tracker.log_artifact(out_dir / "similarity.png")
        tracker.log_artifact(out_dir / "similarity.csv")
    typer.echo(f"similarity of {len(meta['classes'])} classes -> {out_dir}")


@app.command()
def train(
    prepared_dir: Path = typer.Argument(..., help="output of `alignclip prepare`"),
    out_dir: Path = typer.Argument(..., help="where to write model.pt, train_log.csv, train.json"),
    method: str = typer.Option("alignclip", help="zeroshot | erm | clipood | alignclip, optionally +paper or +release"),
    formulation: str = typer.Option("paper", help="paper (default) | release (the authors' released code)"),
    set_: List[str] = typer.Option([], "--set", help="method switch override key=value (repeatable), e.g. aal=false"),
    recipe: Optional[str] = typer.Option(None, help="named hyper-parameter recipe (see `alignclip recipes`)"),
    model: str = typer.Option("tiny", help="model preset or open_clip architecture"),
    pretrained: str = typer.Option("default", help="weights: tag, file, s3:// URI, none, or the preset's default"),
    test_domain: Optional[str] = typer.Option(None, help="held-out domain (domainbed, wild)"),
    seed: int = typer.Option(0),
    steps: Optional[int] = typer.Option(None, help="iterations (default: recipe or 5000)"),
    batch_size: Optional[int] = typer.Option(None, help="batch per training domain (default: recipe or 36)"),
    lr: Optional[float] = typer.Option(None, help="learning rate (default: recipe or 5e-6)"),
    weight_decay: float = typer.Option(0.1),
    hflip: bool = typer.Option(True, help="random horizontal flip"),
    similarity_path: Optional[Path] = typer.Option(None, "--similarity", help="similarity.pt from `alignclip similarity`"),
    num_workers: int = typer.Option(0),
    device: str = typer.Option("auto"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    experiment: str = typer.Option("alignclip", envvar="ALIGNCLIP_EXPERIMENT", help="MLflow experiment"),
):
    """Fine-tune the image encoder with one method; the BMA model is the result."""
    from alignclip import tracking
    from alignclip.recipes import apply_recipe
    from alignclip.train import TrainSettings, train as run_train

    settings = TrainSettings(
        method=method, formulation=formulation, overrides=_parse_overrides(set_), model=model, pretrained=pretrained,
        test_domain=test_domain, seed=seed, weight_decay=weight_decay, hflip=hflip, num_workers=num_workers,
        device=device, progress=progress,
    )
    settings = apply_recipe(settings, recipe, steps=steps, batch_size=batch_size, lr=lr)
    run_name = f"train-{method}-{test_domain or 'all'}-s{seed}"
    with tracking.start_run(experiment, run_name, tags={"stage": "train", "method": method}) as tracker:
        summary = run_train(prepared_dir, out_dir, settings, tracker, similarity_path)
        tracker.log_artifact(out_dir / "train_log.csv")
        tracker.log_artifact(out_dir / "train.json")
        if tracker.enabled:
            _log_image_encoder(tracker, out_dir / "model.pt", f"alignclip-{summary['dataset']}-{method.replace('+', '-').replace('@', '-')}")
    typer.echo(f"{method}: {summary.get('steps', 0)} steps -> {out_dir / 'model.pt'}")


def _log_image_encoder(tracker, checkpoint: Path, registered_name: str) -> None:
    """Log the trained image encoder as an MLflow model and register it (input: a batch of images)."""
    import numpy as np

    from alignclip.evaluate import load_trained

    bundle, visual, _ = load_trained(checkpoint, "cpu")
    # batch of 2: torch.export specialises a size-1 dimension, which would pin the model to batch 1
    example = np.zeros((2, 3, bundle.image_size, bundle.image_size), dtype=np.float32)
    tracker.log_model(visual, "image_encoder", registered_name, example)


@app.command()
def evaluate(
    prepared_dir: Path = typer.Argument(..., help="output of `alignclip prepare`"),
    checkpoint: Path = typer.Argument(..., help="model.pt from `alignclip train`"),
    out_dir: Path = typer.Argument(..., help="where to write metrics.json and predictions.parquet"),
    test_domain: Optional[str] = typer.Option(None, help="held-out domain (domainbed, wild)"),
    test_split: str = typer.Option("holdout", help="held-out domain: 20% split (holdout, CLIPood), 80% split (in, DomainBed) or all (full)"),
    batch_size: int = typer.Option(128),
    num_workers: int = typer.Option(0),
    device: str = typer.Option("auto"),
    experiment: str = typer.Option("alignclip", envvar="ALIGNCLIP_EXPERIMENT", help="MLflow experiment"),
):
    """Top-1 accuracy on every view of the protocol (held-out domain, base/new classes, ImageNet variants)."""
    from alignclip import tracking
    from alignclip.evaluate import evaluate as run_evaluate, flat_metrics

    run_name = f"evaluate-{checkpoint.parent.name}"
    with tracking.start_run(experiment, run_name, tags={"stage": "evaluate"}) as tracker:
        summary = run_evaluate(prepared_dir, checkpoint, out_dir, test_domain, test_split, batch_size, num_workers, device)
        tracker.log_metrics(flat_metrics(summary))
        tracker.log_artifact(out_dir / "metrics.json")
    typer.echo(json.dumps(flat_metrics(summary)))


@app.command()
def report(
    results_dir: Path = typer.Argument(..., help="folder holding evaluation outputs (metrics.json files, any depth)"),
    out_dir: Path = typer.Argument(..., help="where to write tables, figures and the results page"),
    prepared_dir: Optional[Path] = typer.Option(None, help="prepared dataset, for attention-map figures"),
    similarity_dir: Optional[Path] = typer.Option(None, help="`alignclip similarity` output to include"),
    experiment: str = typer.Option("alignclip", envvar="ALIGNCLIP_EXPERIMENT", help="MLflow experiment"),
):
    """Results tables beside the paper's numbers (CSV, Markdown), figures (PNG) and a results page."""
    from alignclip import tracking
    from alignclip.report import build_report

    with tracking.start_run(experiment, "report", tags={"stage": "report"}) as tracker:
        page = build_report(results_dir, out_dir, prepared_dir, similarity_dir)
        tracker.log_artifact(out_dir, "report")
    typer.echo(f"results page: {page}")


def _arguments(items: list[str], params_file: Path | None) -> dict:
    from alignclip.config import pipeline_defaults

    arguments = pipeline_defaults(params_file) if params_file else {}
    arguments.update(_parse_overrides(items))
    return arguments


@pipeline_app.command("compile")
def pipeline_compile(
    family: str = typer.Argument("demo", help="demo | domain_shift | imagenet | base2new | wild | all"),
    output: Path = typer.Option(Path("alignclip-pipeline.yaml"), "--output", "-o", help="YAML package to write"),
    gpu_type: str = typer.Option("nvidia.com/gpu", help="accelerator resource of train/evaluate tasks"),
    gpus: int = typer.Option(1, help="accelerators per train/evaluate task"),
    node_selector: List[str] = typer.Option([], help="label=value for GPU tasks (repeatable)"),
    toleration: List[str] = typer.Option([], help="key[=value]:Effect for GPU tasks (repeatable)"),
    retries: int = typer.Option(2, help="retries of the training task"),
):
    """Compile a pipeline to a KFP YAML package (parameter defaults from params.yaml)."""
    from alignclip.pipeline_cli import cluster_settings, compile_pipeline

    cluster = cluster_settings(gpu_type, gpus, node_selector or None, toleration or None, retries)
    path = compile_pipeline(family, output, cluster)
    typer.echo(f"compiled {family} -> {path}")


@pipeline_app.command("submit")
def pipeline_submit(
    family: str = typer.Argument("demo", help="demo | domain_shift | imagenet | base2new | wild | all"),
    host: str = typer.Option(..., envvar="KFP_HOST", help="KFP API endpoint, e.g. http://localhost:8080"),
    experiment: Optional[str] = typer.Option(None, help="KFP experiment (default: the family's)"),
    run_name: Optional[str] = typer.Option(None, help="run name"),
    param: List[str] = typer.Option([], "--param", help="pipeline parameter override name=value (repeatable)"),
    params_file: Optional[Path] = typer.Option(Path("params.yaml"), help="parameters file (params.yaml)"),
):
    """Submit a run to a Kubeflow Pipelines cluster and print its URL."""
    from alignclip.pipeline_cli import submit

    url = submit(family, host, experiment, run_name, _arguments(param, params_file if family != "all" else None))
    typer.echo(url)


@pipeline_app.command("run")
def pipeline_run(
    family: str = typer.Argument("demo"),
    local: bool = typer.Option(True, "--local/--no-local", help="run with kfp's local SubprocessRunner (no cluster)"),
    pipeline_root: Path = typer.Option(Path("outputs/kfp"), help="where the local runner keeps artifacts"),
    param: List[str] = typer.Option([], "--param", help="pipeline parameter override name=value (repeatable)"),
    params_file: Optional[Path] = typer.Option(Path("params.yaml"), help="parameters file (params.yaml)"),
):
    """Run the real DAG locally: every component as a subprocess of this machine."""
    from alignclip.pipeline_cli import run_local

    if not local:
        raise typer.BadParameter("use `alignclip pipeline submit` for a cluster")
    run_local(family, pipeline_root.resolve(), _arguments(param, params_file))
    typer.echo(f"pipeline {family} finished; artifacts under {pipeline_root}")


@app.command()
def recipes():
    """List the named hyper-parameter recipes and their sources."""
    from alignclip.recipes import RECIPES

    for name, recipe in RECIPES.items():
        typer.echo(f"{name:32s} {recipe.describe()}")


def main() -> None:
    try:
        app()
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        # Bad input: one readable line naming what is wrong, no traceback (use --log-level DEBUG for one).
        get_logger("alignclip").debug("error", exc_info=True)
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
