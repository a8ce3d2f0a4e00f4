"""`alignclip report`: tables shaped like the paper's (ours beside the published numbers), figures, a results page.

Tables (CSV and Markdown) aggregate every ``metrics.json`` below a results folder: mean and standard deviation
over seeds, per held-out domain / split, with the paper's number and our difference where the paper has one.
Figures (PNG): the class similarity heatmap (fig. 6), training curves, class-token attention and token/text
similarity maps over images, zero-shot vs fine-tuned (fig. 1b, 4, 7, 8), and top-5 predictions with and
without SLS (fig. 4).
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from alignclip import artifacts, protocols  # noqa: E402
from alignclip.datafiles import METRICS, TRAIN_SUMMARY, read_json  # noqa: E402
from alignclip.figures import LABEL_SIZE, class_order, figure_provenance, save_figure  # noqa: E402
from alignclip.log import get_logger  # noqa: E402

log = get_logger(__name__)


# ------------------------------------------------------------------------------------------------ results


def collect(results_dir: str | Path) -> pd.DataFrame:
    """One row per (run, view) from every metrics.json below ``results_dir``."""
    rows = []
    for path in sorted(Path(results_dir).rglob(artifacts.METRICS)):
        summary = read_json(path, METRICS, "the metrics of `alignclip evaluate`")
        if summary.get("protocol") not in protocols.PROTOCOLS:
            raise ValueError(f"{path}: unknown protocol {summary.get('protocol')!r}: expected one of {', '.join(protocols.PROTOCOLS)}")
        for view, value in summary["views"].items():
            rows.append(
                {
                    "dataset": summary["dataset"],
                    "protocol": summary["protocol"],
                    "method": summary["method"],
                    "variant": summary.get("variant") or _method_label(summary["method"], summary.get("formulation", "paper")),
                    "formulation": summary.get("formulation", "paper"),
                    "test_domain": summary.get("test_domain") or "",
                    "test_split": summary.get("test_split") or "",
                    "seed": summary.get("seed"),
                    "hparams": _hparams(path, summary),
                    "view": view,
                    "accuracy": value["accuracy"],
                    "total": value["total"],
                    "source": str(path),
                }
            )
    return pd.DataFrame(rows)


def _hparams(metrics_path: Path, summary: dict) -> str:
    """The cell's grid setting (``hparams``: metrics.json's, else its train.json's; absent: none), as selection keys it."""
    from alignclip.selection import hparams_key

    if "hparams" in summary:
        return hparams_key(summary["hparams"])
    train_json = metrics_path.parent / artifacts.TRAIN_SUMMARY
    return hparams_key(json.loads(train_json.read_text()).get("hparams") if train_json.is_file() else None)


def _method_label(method: str, formulation: str) -> str:
    return method if formulation == "paper" or method != "alignclip" else f"{method} ({formulation})"


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of every (dataset, protocol, method, formulation, held-out domain, view)."""
    keys = ["dataset", "protocol", "method", "variant", "formulation", "test_domain", "test_split", "view"]
    grouped = results.groupby(keys, dropna=False)["accuracy"]
    out = grouped.agg(mean="mean", std="std", seeds="count").reset_index()
    return out


def build_tables(summary: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Tables keyed by name, each with ``ours`` and ``paper`` and ``diff`` columns where the paper has a number;
    each protocol shapes its own (protocols/<name>.py)."""
    tables: dict[str, pd.DataFrame] = {}
    for (dataset, protocol_name), part in summary.groupby(["dataset", "protocol"]):
        protocol = protocols.get_protocol(protocol_name)
        rows = protocol.table_rows(dataset, part.assign(label=part["variant"]))
        tables[f"{protocol.table_prefix}_{dataset}"] = pd.DataFrame(rows)
    return tables


def to_markdown(table: pd.DataFrame, diffs: pd.DataFrame | None = None) -> str:
    """The table in the paper's shape (methods x held-out domains and Avg), then the differences to ERM and to
    zero-shot with their intervals when ``diffs`` (report_tables.differences) has them."""
    from alignclip import report_tables

    return report_tables.blocks_markdown(report_tables.table_blocks(table, diffs if diffs is not None else _NO_DIFFS))


_NO_DIFFS = pd.DataFrame(columns=["method", "baseline", "column", "diff", "low", "high", "images", "significant"])


# ------------------------------------------------------------------------------------------------ figures

@dataclass
class RunRecord:
    """One evaluated run of the results folder: what it is and where its files are."""

    run: str  # the run's folder below the results folder
    method: str
    formulation: str
    variant: str
    test_domain: str
    seed: int | None
    metrics: Path
    predictions: Path | None
    checkpoint: Path | None

    @property
    def label(self) -> str:
        """The variant label: ``alignclip``, ``alignclip+release``, ``erm[pooling=avg]``..."""
        return self.variant

    def describe(self) -> dict:
        return {"run": self.run, "method": self.method, "formulation": self.formulation, "variant": self.variant,
                "test_domain": self.test_domain, "seed": self.seed,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None}

    def caption(self) -> str:
        return f"{self.label}, held out {self.test_domain or '-'}, seed {self.seed}"


def find_runs(results_dir: str | Path) -> list[RunRecord]:
    """Every metrics.json below ``results_dir`` with its predictions and the checkpoint it evaluated.

    The checkpoint is the ``model.pt`` beside the metrics (DVC layout) or, when models live elsewhere (the KFP
    report's ``models/NNN``), the one whose train.json has the same method, formulation, held-out domain, seed
    and method switches."""
    from alignclip.methods import MethodConfig, variant_label
    from alignclip.selection import hparams_key

    results_dir = Path(results_dir)
    trained = {}
    for train_json in sorted(results_dir.rglob(artifacts.TRAIN_SUMMARY)):
        if not (train_json.parent / artifacts.MODEL).exists():
            continue
        info = read_json(train_json, TRAIN_SUMMARY, "the summary of `alignclip train`")
        settings = info.get("settings", {})
        try:
            # train.json's own label: its method holds the resolved temperatures, not the `model` they were set to
            variant = info.get("variant") or variant_label(MethodConfig(**info["method"]), settings.get("formulation", "paper"),
                                                          settings.get("recipe"))
        except (TypeError, KeyError, ValueError):
            continue
        key = (variant, settings.get("formulation", "paper"), settings.get("test_domain") or "", settings.get("seed"),
               hparams_key(info.get("hparams")))  # cells of a grid differ in hparams alone
        trained.setdefault(key, train_json.parent / artifacts.MODEL)
    runs = []
    for path in sorted(results_dir.rglob(artifacts.METRICS)):
        summary = read_json(path, METRICS, "the metrics of `alignclip evaluate`")
        formulation = summary.get("formulation", "paper")
        variant = summary.get("variant") or summary["method"]
        domain = summary.get("test_domain") or ""
        beside = path.parent / artifacts.MODEL
        checkpoint = beside if beside.exists() else trained.get((variant, formulation, domain, summary.get("seed"),
                                                                 _hparams(path, summary)))
        predictions = path.parent / artifacts.PREDICTIONS
        runs.append(RunRecord(str(path.parent.relative_to(results_dir)), summary["method"], formulation, variant, domain,
                              summary.get("seed"), path, predictions if predictions.exists() else None, checkpoint))
    return runs


def pick_runs(runs: list[RunRecord], wanted: list[str], domains: list[str], need: str) -> list[RunRecord]:
    """One run per wanted label (``zeroshot``, ``erm``, ``alignclip``, ``alignclip+release``...), all of one held-out
    domain and seed: the first domain (dataset order) and lowest seed for which the most wanted labels have
    ``need`` (checkpoint or predictions). Labels match exactly, so ``alignclip`` never picks ``alignclip+release``."""
    usable = [r for r in runs if getattr(r, need) is not None]
    best: list[RunRecord] = []
    order = {d: i for i, d in enumerate(domains)}
    cells = sorted({(r.test_domain, r.seed if r.seed is not None else -1) for r in usable},
                   key=lambda c: (order.get(c[0], len(order)), c[0], c[1]))
    for domain, seed in cells:
        chosen = []
        for label in wanted:
            match = [r for r in usable if r.label == label and r.test_domain == domain and (r.seed if r.seed is not None else -1) == seed]
            if match:
                chosen.append(match[0])
        if len(chosen) > len(best):
            best = chosen
    return best


def plot_training_curves(logs: dict[str, pd.DataFrame], path: str | Path, runs: dict[str, RunRecord] | None = None) -> None:
    """Loss terms per step, then the gradient norm of each term (as it enters the total) on the steps that measured
    it, one line per run: colour = method/formulation, line style = held-out domain."""
    wanted = ("loss", "cls_loss", "aal_attn", "aal_sim", "grad_norm_cls_loss", "grad_norm_aal_attn", "grad_norm_aal_sim")
    columns = [c for c in wanted if any(c in df and df[c].notna().any() for df in logs.values())]
    per_row = min(4, len(columns))  # losses above, gradient norms below: readable at the page's width
    fig, axes = plt.subplots(math.ceil(len(columns) / per_row), per_row, figsize=(4.2 * per_row, 3.6 * math.ceil(len(columns) / per_row)), squeeze=False)
    for ax in axes.flat[len(columns):]:
        ax.axis("off")
    runs = runs or {}
    labels = sorted({runs[n].label if n in runs else n for n in logs})
    domains = sorted({runs[n].test_domain for n in logs if n in runs})
    colours = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    styles = {domain: ("-", "--", ":", "-.")[i % 4] for i, domain in enumerate(domains)}
    for ax, column in zip(axes.flat, columns):
        for name, df in logs.items():
            if column in df and len(df):
                record = runs.get(name)
                legend = record.caption() if record else name
                df = df[df[column].notna()]  # gradient norms: measured on log steps only
                ax.plot(df["step"], df[column], label=legend, color=colours[record.label if record else name],
                        linestyle=styles.get(record.test_domain, "-") if record else "-", linewidth=1.2)
        ax.set_title(column, fontsize=LABEL_SIZE + 1)
        if column.startswith("grad_norm") and ax.lines:
            ax.set_yscale("log")  # the terms' gradients can differ by orders of magnitude
        ax.set_xlabel("step", fontsize=LABEL_SIZE)
        ax.tick_params(labelsize=LABEL_SIZE)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(3, max(1, len(names))), fontsize=LABEL_SIZE, frameon=False)
    rows = math.ceil(len(names) / 3)
    fig.tight_layout(rect=(0, min(0.6, 0.07 * rows + 0.02), 1, 1))
    save_figure(fig, path, {"figure": "training curves", "runs": [runs[n].describe() if n in runs else {"run": n} for n in logs]})


def _spread(classes_present: list[int], count: int) -> list[int]:
    """``count`` classes spread over the dataset's class order."""
    if len(classes_present) <= count:
        return classes_present
    step = len(classes_present) / count
    return [classes_present[int(i * step)] for i in range(count)]


def attention_maps(runs: list[RunRecord], prepared_dir: Path, path: Path, count: int = 5,
                   test_split: str = protocols.TEST_SPLITS[0]) -> dict | None:
    """Fig. 1b/4/7/8: images of several classes of one held-out domain; for each model its class-token attention
    A_c, token/text similarity G and the D-V branch's G_DV, over the image (``objective.attention_maps``: the
    maps the alignment loss compares).

    The maps are computed with the attention settings of the run's own checkpoint (aligned layers, A_c
    normalisation, D-V depth and branch, temperature of G); models trained without the alignment loss take those of
    the AlignCLIP run beside them, so every column is computed the same way (or the paper's defaults, if none)."""
    from alignclip.classifier import load_trained
    from alignclip.data.prepare import load_prepared

    if not runs:
        return None
    manifest, meta = load_prepared(prepared_dir)
    domain = runs[0].test_domain or None
    view = protocols.evaluation_views(manifest, meta, domain, test_split)[0]
    if view.rows.empty:
        return None
    firsts = view.rows.drop_duplicates("label")
    order, _ = class_order(meta)
    rank = {c: i for i, c in enumerate(order)}
    present = sorted(firsts["label"].tolist(), key=lambda c: rank.get(c, c))
    rows = firsts.set_index("label").loc[_spread(present, count)].reset_index()
    loaded = [(run, *load_trained(run.checkpoint, "cpu")) for run in runs]
    reference = next((state.method for _, _, _, state in loaded if state.method.get("aal")), None)
    panels = [(run, *_attention_panel(bundle, state.method, reference, view, rows, meta)) for run, bundle, _, state in loaded]
    provenance = {"figure": "attention maps (fig. 1b, 4, 7, 8)", "test_domain": domain, "test_split": test_split,
                  "classes": [meta["classes"][int(c)] for c in rows["label"]], "images": rows["path"].tolist(),
                  "runs": [{**run.describe(), "attention": attention} for run, attention, _ in panels]}
    _draw_attention_maps(panels, rows, meta, runs, provenance, path)
    return provenance


def _attention_panel(bundle, own: dict, reference: dict | None, view, rows: pd.DataFrame, meta: dict) -> tuple[dict, dict]:
    """One model's maps of ``rows``' images (``objective.attention_maps``) and the attention settings used: its own
    where it trained the alignment loss, else ``reference``'s (the AlignCLIP run beside it) or the paper's."""
    import torch

    from alignclip import objective
    from alignclip.classifier import encode_classes
    from alignclip.data.images import ManifestImages, eval_transform
    from alignclip.methods import MethodConfig
    from alignclip.model import AlignCLIPVisual, attention_depth

    settings = MethodConfig(**(own if own.get("aal") else (reference or MethodConfig().to_dict()))).for_model(bundle.tau)
    depth = attention_depth(bundle.model.visual)
    # borrowed settings may ask for more layers than this model has (a CLIP ResNet has one attention pool)
    aligned = settings.aligned_layers if own.get("aal") else min(settings.aligned_layers, depth)
    dv_layers = settings.dv_layers if own.get("aal") or settings.dv_layers is None else min(settings.dv_layers, depth)
    # the fine-tuned image encoder: load_trained put its weights into bundle.model.visual
    wrapped = AlignCLIPVisual(bundle.model.visual, aligned_layers=aligned, dv_layers=dv_layers,
                              branch=settings.branch, cls_attn_norm=settings.cls_attn_norm).eval()
    space = view.label_space
    text = encode_classes(bundle.model, bundle.tokenizer, [meta["classes"][g] for g in space], meta["template"], "cpu")
    data = ManifestImages(meta, rows["path"].tolist(), rows["label"].tolist(), space, eval_transform(bundle.image_size, bundle.mean, bundle.std))
    images = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        maps = objective.attention_maps(settings, wrapped, images, text, torch.tensor(data.targets))
    attention = {"aligned_layers": wrapped.aligned_layers, "cls_attn_norm": settings.cls_attn_norm,
                 "dv_layers": wrapped.dv_layers, "branch": settings.branch, "aal_tau": settings.aal_tau,
                 "from": "own checkpoint" if own.get("aal") else ("AlignCLIP run beside it" if reference else "paper defaults")}
    return attention, maps


ATTENTION_MAPS = ("A_c", "G", "G_DV")


def _draw_attention_maps(panels: list, rows: pd.DataFrame, meta: dict, runs: list[RunRecord], provenance: dict,
                         path: Path) -> None:
    """The images in the first column, then each model's maps over them, a colour bar under each column."""
    from alignclip.data.prepare import image_path
    from alignclip.storage import open_image

    domain, test_split = provenance["test_domain"], provenance["test_split"]
    raw = [np.asarray(open_image(image_path(meta, p))) for p in rows["path"]]
    columns = 1 + len(ATTENTION_MAPS) * len(panels)
    fig, axes = plt.subplots(len(raw) + 1, columns, figsize=(1.9 * columns, 1.9 * len(raw) + 1.2), squeeze=False,
                             gridspec_kw={"height_ratios": [1] * len(raw) + [0.08]})
    grid = int(round(panels[0][2]["A_c"].shape[1] ** 0.5))
    for i, image in enumerate(raw):
        axes[i][0].imshow(image)
        axes[i][0].set_ylabel(meta["classes"][int(rows["label"].iloc[i])], fontsize=LABEL_SIZE)
        axes[i][0].set_xticks([])
        axes[i][0].set_yticks([])
    axes[0][0].set_title(f"held out\n{domain or '-'}", fontsize=LABEL_SIZE)
    axes[-1][0].axis("off")
    col = 1
    for run, _, values in panels:
        for name in ATTENTION_MAPS:
            column = values[name].numpy()
            top = float(column.max()) or 1.0
            for i, image in enumerate(raw):
                ax = axes[i][col]
                ax.imshow(image)
                shown = ax.imshow(column[i].reshape(grid, grid), cmap="jet", alpha=0.55, vmin=0.0, vmax=top,
                                  extent=(0, image.shape[1], image.shape[0], 0), interpolation="bilinear")
                ax.axis("off")
            axes[0][col].set_title(f"{run.label}\n{name}", fontsize=LABEL_SIZE)
            bar = fig.colorbar(shown, cax=axes[-1][col], orientation="horizontal")
            bar.ax.tick_params(labelsize=LABEL_SIZE - 2)
            bar.locator = matplotlib.ticker.MaxNLocator(2)
            bar.update_ticks()
            col += 1
    seeds = sorted({str(r.seed) for r in runs})
    fig.suptitle(f"held-out domain {domain or '-'} ({test_split} split), seed {', '.join(seeds)}; each map sums to 1 "
                 "over the image's tokens, colour bars under each column", fontsize=LABEL_SIZE)
    fig.tight_layout()
    save_figure(fig, path, provenance)


def top5_figure(with_sls: pd.DataFrame, without_sls: pd.DataFrame, classes: list[str], path: Path, count: int = 4,
                runs: tuple[RunRecord, RunRecord] | None = None) -> bool:
    """Fig. 4 (top row): top-5 predicted classes of the same images (one per class, several classes) by a model
    without SLS and one with it."""
    common = with_sls.merge(without_sls, on=["view", "path"], suffixes=("_sls", "_plain"))
    common = common[common["view"] == common["view"].iloc[0]] if not common.empty else common
    if common.empty:
        return False
    firsts = common.drop_duplicates("label_sls")
    present = sorted(firsts["label_sls"].tolist())
    common = firsts.set_index("label_sls", drop=False).loc[_spread(present, count)].reset_index(drop=True)
    names = {"_sls": runs[0].caption() if runs else "with SLS", "_plain": runs[1].caption() if runs else "without SLS"}
    fig, axes = plt.subplots(len(common), 2, figsize=(10, 2.0 * len(common) + 0.6), squeeze=False)
    for i, (_, r) in enumerate(common.iterrows()):
        for j, (suffix, title) in enumerate((("_plain", "without SLS"), ("_sls", "with SLS"))):
            top = [int(x) for x in str(r["top5" + suffix]).split(",")]
            probs = [float(x) for x in str(r["top5_prob" + suffix]).split(",")]
            colors = ["tab:green" if t == r["label_sls"] else "tab:gray" for t in top]
            axes[i][j].barh(range(len(top))[::-1], probs, color=colors)
            axes[i][j].set_yticks(range(len(top))[::-1], [classes[t] for t in top], fontsize=LABEL_SIZE)
            axes[i][j].set_xlim(0, 1)
            axes[i][j].tick_params(labelsize=LABEL_SIZE)
            axes[i][j].set_title(f"{title}: {names[suffix]}\ntrue class: {classes[int(r['label_sls'])]}", fontsize=LABEL_SIZE)
        axes[i][0].set_xlabel("probability (softmax at tau)", fontsize=LABEL_SIZE)
        axes[i][1].set_xlabel("probability (softmax at tau)", fontsize=LABEL_SIZE)
    fig.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="tab:green"), plt.Rectangle((0, 0), 1, 1, color="tab:gray")],
               labels=["true class", "other class"], loc="lower center", ncol=2, fontsize=LABEL_SIZE, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    provenance = {"figure": "top-5 predictions (fig. 4)", "view": str(common["view"].iloc[0]),
                  "classes": [classes[int(c)] for c in common["label_sls"]], "images": common["path"].tolist(),
                  "runs": {"with_sls": runs[0].describe() if runs else None, "without_sls": runs[1].describe() if runs else None}}
    save_figure(fig, path, provenance)
    return True


# ------------------------------------------------------------------------------------------------ the page

SPLIT_STATEMENT = {
    "holdout": "the held-out domain's 20% split (CLIPood's protocol)",
    "in": "the held-out domain's 80% split (what DomainBed reports)",
    "full": "the whole held-out domain",
}


def table_caption(results: pd.DataFrame) -> str:
    """What a table's numbers are computed on: test split, test-set sizes per column, seeds, run count."""
    parts = []
    splits = sorted({s for s in results["test_split"].unique() if s})
    if splits:
        parts.append("Test split: " + "; ".join(f"`{s}` = {SPLIT_STATEMENT.get(s, s)}" for s in splits) + ".")
    else:
        parts.append("Test split: the protocol's test set of each view.")
    test = results[results["view"].isin(["test"])] if (results["view"] == "test").any() else results
    sizes = []
    for (domain, view), part in test.groupby(["test_domain", "view"], sort=True):
        totals = sorted({int(t) for t in part["total"]})
        name = " ".join(x for x in (domain, view if view != "test" else "") if x)
        sizes.append(f"{name}: {'/'.join(str(t) for t in totals)}")
    parts.append("Test images: " + ", ".join(sizes) + ".")
    seeds = sorted({int(s) for s in results["seed"].dropna().unique()})
    parts.append(f"Seeds: {', '.join(str(s) for s in seeds) or '-'} (mean ± std over seeds; column `seeds` counts them).")
    parts.append(f"Runs: {results['source'].nunique()}. Accuracy in %; no std where there is one seed (`1 run`); `—`: no value.")
    return " ".join(parts)


def build_report(results_dir, out_dir, prepared_dir=None, similarity_dir=None) -> Path:
    """Write the report into a staging folder that then replaces ``out_dir`` whole (no stale table or figure of
    an earlier report stays beside the new ones; a failure leaves the previous report). A non-empty folder that
    is not a report of ours (no report.json) is refused, so nothing of the user's is replaced."""
    from alignclip.publish import stage_output

    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").is_file():
        raise FileExistsError(f"{out} is not empty and holds no report.json: choose an empty or new folder for the report")
    with stage_output(out, "report", allowed=None) as staging:
        _build_report(Path(results_dir), staging, prepared_dir, similarity_dir)
    return out / artifacts.REPORT_PAGE


def _build_report(results_dir: Path, out: Path, prepared_dir=None, similarity_dir=None) -> Path:
    from alignclip import selection

    everything = collect(results_dir)
    if everything.empty:
        raise FileNotFoundError(f"no metrics.json below {results_dir}: run `alignclip evaluate` first")
    results, searched = selection.select(everything)  # the cells training-domain validation chose
    reported = everything["source"].isin(set(results["source"]))
    everything.assign(reported=reported).to_csv(out / "results_long.csv", index=False)
    searched.to_csv(out / "selection.csv", index=False)
    summary = summarise(results)
    summary.to_csv(out / "summary.csv", index=False)
    tables = build_tables(summary)
    intro = f"Runs: {everything['source'].nunique()} evaluations from `{results_dir}`."
    if not reported.all():
        intro += f" Reported: the {results['source'].nunique()} chosen by model selection (below)."
    captions, blocks, scores = {}, {}, {}
    for name, table in tables.items():
        captions[name], blocks[name], scores[name] = _write_table(name, table, results, out)
    choice = selection.selection_summary(searched)
    figures = _figures(results_dir, out, results, prepared_dir, similarity_dir)
    overview = method_overview(results)  # source-val beside held-out accuracy, with the temperatures used
    (out / artifacts.REPORT_MARKDOWN).write_text(_markdown(intro, blocks, captions, choice, figures, overview))
    (out / artifacts.REPORT_PAGE).write_text(_html(intro, blocks, captions, choice, figures, overview))
    (out / artifacts.SCORES).write_text(json.dumps(scores, indent=2) + "\n")
    chosen = [{"dataset": r["dataset"], "protocol": r["protocol"], "variant": r["variant"], "test_domain": r["test_domain"],
               "hparams": json.loads(r["hparams"]), "val_mean": r["val_mean"]} for _, r in searched[searched["chosen"]].iterrows()]
    (out / "report.json").write_text(json.dumps({"tables": list(tables), "captions": captions, "figures": [f for _, f, _ in figures],
                                                 "selection": chosen}, indent=2) + "\n")
    log.info("report: %d tables, %d figures -> %s", len(tables), len(figures), out / artifacts.REPORT_PAGE)
    return out / artifacts.REPORT_PAGE


def reported_results(results_dir: str | Path) -> pd.DataFrame:
    """The rows of ``collect`` that the report's tables show: the cells model selection chose."""
    from alignclip import selection

    results = collect(results_dir)
    return selection.select(results)[0] if not results.empty else results


def _write_table(name: str, table: pd.DataFrame, results: pd.DataFrame, out: Path) -> tuple[str, list, dict]:
    """One results table: long CSV, its differences to the baselines (CSV), the paper-shaped Markdown; returns its
    caption, display blocks and scores (report_tables)."""
    from alignclip import report_tables

    dataset, protocol = _table_key(name, results)
    part = results[(results["dataset"] == dataset) & (results["protocol"] == protocol)]
    view = report_tables.headline_view(protocol) if protocol else "test"
    table = _with_avg_std(table, part, view)
    diffs = report_tables.differences(part, table, f"{dataset}/{protocol}", view)
    table.to_csv(out / f"{name}.csv", index=False)
    diffs.to_csv(out / f"{name}_differences.csv", index=False)
    blocks = report_tables.table_blocks(table, diffs)
    (out / f"{name}.md").write_text(report_tables.blocks_markdown(blocks))
    return table_caption(part), blocks, report_tables.scores(table, diffs)


def _with_avg_std(table: pd.DataFrame, results: pd.DataFrame, view: str) -> pd.DataFrame:
    """The Avg rows' std: over seeds of each seed's average over the held-out domains (report_tables.avg_std)."""
    from alignclip.report_tables import AVG, avg_std

    table = table.copy()
    for i in table.index[table["split"] == AVG]:
        method = table.at[i, "method"]
        domains = [d for d in table.loc[table["method"] == method, "split"] if d != AVG]
        std = avg_std(results[results["variant"] == method], domains, view)
        if std is not None:
            table.at[i, "ours_std"] = round(std, 2)
    return table


def _figures(results_dir: Path, out: Path, results: pd.DataFrame, prepared_dir=None, similarity_dir=None) -> list:
    """(title, file, caption) of each figure, drawn from the reported cells only."""
    figures = []
    meta = json.loads((Path(prepared_dir) / artifacts.META).read_text()) if prepared_dir else None
    if similarity_dir and (Path(similarity_dir) / artifacts.SIMILARITY_HEATMAP).exists():
        target = out / artifacts.SIMILARITY_HEATMAP
        target.write_bytes((Path(similarity_dir) / artifacts.SIMILARITY_HEATMAP).read_bytes())
        how = figure_provenance(target).get("class_order", "label order")
        figures.append(("Class similarity matrix (fig. 6)", target.name, f"Classes in {how}."))
    reported = set(results["source"])
    runs = [r for r in find_runs(results_dir) if str(r.metrics) in reported]
    figures += _curves_figure(results_dir, out, runs)
    if prepared_dir:
        split = next((s for s in results["test_split"] if s), "holdout")
        figures += _model_figures(runs, Path(prepared_dir), meta, out, split)
    return figures


def _curves_figure(results_dir: Path, out: Path, runs: list[RunRecord]) -> list:
    by_folder = {r.run: r for r in runs}
    for run in runs:
        if run.checkpoint is not None and run.checkpoint.parent.is_relative_to(results_dir):
            by_folder[str(run.checkpoint.parent.relative_to(results_dir))] = run
    logs = {}
    for log_path in sorted(results_dir.rglob(artifacts.TRAIN_LOG)):
        folder = str(log_path.parent.relative_to(results_dir))
        frame = pd.read_csv(log_path) if folder in by_folder else None
        if frame is not None and len(frame):
            logs[folder] = frame
    if not logs:
        return []
    plot_training_curves(logs, out / "training_curves.png", {k: v for k, v in by_folder.items() if k in logs})
    return [("Training curves", "training_curves.png", "One line per run: colour = method, line style = held-out domain.")]


def _model_figures(runs: list[RunRecord], prepared_dir: Path, meta: dict, out: Path, split: str) -> list:
    figures = []
    chosen = pick_runs(runs, ["zeroshot", "erm", "alignclip", "alignclip+release"], meta["domains"], "checkpoint")
    provenance = attention_maps(chosen, prepared_dir, out / "attention_maps.png", test_split=split) if chosen else None
    if provenance:
        settings = "; ".join(
            f"{r['variant']}: {r['attention']['aligned_layers']} aligned layers, A_c {r['attention']['cls_attn_norm']}, "
            f"D-V over the last {r['attention']['dv_layers']} blocks, tau of G {r['attention']['aal_tau'] if r['attention']['aal_tau'] is not None else 'none'} "
            f"({r['attention']['from']})" for r in provenance["runs"])
        figures.append((
            "Class-token attention A_c, token/text similarity G and the D-V branch's G_DV, per model (fig. 1b, 4, 7, 8)",
            "attention_maps.png",
            f"Held-out domain {provenance['test_domain']}, runs: {_run_list(provenance['runs'])}. Settings: {settings}.",
        ))
    pair = pick_runs(runs, ["alignclip", "erm"], meta["domains"], "predictions")
    if len(pair) < 2:
        pair = pick_runs(runs, ["alignclip", "clipood"], meta["domains"], "predictions")
    if len(pair) == 2 and pair[0].label == "alignclip":
        sls, plain = pair
        if top5_figure(pd.read_parquet(sls.predictions), pd.read_parquet(plain.predictions), meta["classes"], out / "top5.png",
                       runs=(sls, plain)):
            figures.append((f"Top-5 predictions without SLS ({plain.label}) and with SLS (AlignCLIP) (fig. 4)", "top5.png",
                            f"Runs: {_run_list([plain.describe(), sls.describe()])}."))
    return figures


def _fmt(mean: float | None) -> str:
    """One accuracy of the overview table, one decimal ("—" when there is none)."""
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "—"
    return f"{mean:.1f}"


OVERVIEW_COLUMNS = ["method", "source_val", "held-out test", "cells", "tau (eq. 1)", "aal_tau (eq. 4)"]


def method_overview(results: pd.DataFrame) -> dict[str, list[list[str]]]:
    """Per dataset of a protocol with source-domain validation (``source_val``): each variant's mean accuracy on
    the source domains' validation split and on the held-out test view over its cells (held-out domain x seed),
    beside the temperatures its runs used (metrics.json: training's, resolved from the model's own by default)."""
    from alignclip.protocols.base import ordered_labels

    temperatures = {}
    for source in results["source"].unique():
        metrics = json.loads(Path(source).read_text())
        temperatures[source] = (_temperature(metrics, "tau"), _temperature(metrics, "aal_tau"))
    tables = {}
    for (dataset, protocol), part in results.groupby(["dataset", "protocol"], sort=True):
        if not (part["view"] == "source_val").any():
            continue
        rows = []
        for variant in ordered_labels(part["variant"].unique()):
            mine = part[part["variant"] == variant]
            accuracy = {view: mine[mine["view"] == view]["accuracy"] for view in ("source_val", "test")}
            cells = mine[["test_domain", "seed"]].drop_duplicates().shape[0]
            taus = sorted({temperatures[s][0] for s in mine["source"]})
            aal_taus = sorted({temperatures[s][1] for s in mine["source"]})
            rows.append([variant, *(_fmt(a.mean()) if len(a) else "—" for a in accuracy.values()), str(cells),
                         "/".join(taus), "/".join(aal_taus)])
        tables[f"{protocols.get_protocol(protocol).table_prefix}_{dataset}"] = rows
    return tables


def _temperature(metrics: dict, key: str) -> str:
    if key not in metrics:
        return "—"  # evaluated before metrics.json recorded it
    value = metrics[key]
    return "none" if value is None else f"{float(value):.4g}"


def _overview_markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(OVERVIEW_COLUMNS) + " |", "|" + "---|" * len(OVERVIEW_COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


OVERVIEW_CAPTION = ("Mean accuracy (%) over the variant's cells (held-out domain x seed): `source_val` = the training "
                    "domains' validation split (the only split a model may be selected or tuned on), held-out test = "
                    "the table above's test view. tau: eq. 1's temperature, the loaded CLIP's 1/exp(logit_scale) "
                    "unless a run fixed it; aal_tau: eq. 4's (none: no temperature, the released code).")


def _run_list(runs: list[dict]) -> str:
    return "; ".join(f"{r['variant']} ({r['formulation']}) `{r['run']}`, seed {r['seed']}" for r in runs)


def _table_key(name: str, results: pd.DataFrame) -> tuple[str, str]:
    """(dataset, protocol) of a table name from build_tables."""
    keys = results[["dataset", "protocol"]].drop_duplicates().itertuples(index=False)
    matches = sorted((k for k in keys if name.endswith(f"_{k[0]}")), key=lambda k: -len(k[0]))
    return tuple(matches[0]) if matches else ("", "")


SELECTION_TITLE = "Source-validation accuracy of each searched setting"


def _markdown(intro, blocks, captions, choice, figures, overview=None) -> str:
    from alignclip.report_tables import blocks_markdown

    sections = ["# AlignCLIP results\n", intro + "\n"]
    for name, shown in blocks.items():
        sections.append(f"## {name}\n\n{blocks_markdown(shown)}\n{captions[name]}\n")
    statement, header, rows = choice
    sections.append(f"## Model selection\n\n{statement}\n" + (f"\n{blocks_markdown([(SELECTION_TITLE, header, rows)])}" if rows else ""))
    for name, rows in (overview or {}).items():
        sections.append(f"## Source validation and held-out accuracy per method: {name}\n\n{_overview_markdown(rows)}\n{OVERVIEW_CAPTION}\n")
    for title, name, caption in figures:
        sections.append(f"## {title}\n\n![{title}]({name})\n\n{caption}\n")
    return "\n".join(sections)


def _html(intro, blocks, captions, choice, figures, overview=None) -> str:
    from alignclip.report_tables import blocks_html

    body = ["<h1>AlignCLIP results</h1>", f"<p>{html.escape(intro, quote=False).replace('`', '')}</p>"]
    for name, shown in blocks.items():
        body.append(f"<h2>{html.escape(name)}</h2>{blocks_html(shown)}")
        body.append(f"<p class='caption'>{html.escape(captions[name], quote=False).replace('`', '')}</p>")
    statement, header, rows = choice
    body.append(f"<h2>Model selection</h2><p>{html.escape(statement, quote=False).replace('`', '')}</p>")
    if rows:
        body.append(blocks_html([(SELECTION_TITLE, header, rows)]))
    for name, rows in (overview or {}).items():
        body.append(f"<h2>Source validation and held-out accuracy per method: {html.escape(name)}</h2>")
        body.append(blocks_html([("", OVERVIEW_COLUMNS, rows)]))
        body.append(f"<p class='caption'>{html.escape(OVERVIEW_CAPTION, quote=False).replace('`', '')}</p>")
    for title, name, caption in figures:
        body.append(f"<h2>{html.escape(title)}</h2><img src='{html.escape(name)}' style='max-width:100%'>"
                    f"<p class='caption'>{html.escape(caption, quote=False).replace('`', '')}</p>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto} table{border-collapse:collapse} "
             "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left} .caption{color:#444;font-size:0.9em}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>AlignCLIP results</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
