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
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from alignclip import artifacts, protocols  # noqa: E402
from alignclip.log import get_logger  # noqa: E402

log = get_logger(__name__)


# ------------------------------------------------------------------------------------------------ results


def collect(results_dir: str | Path) -> pd.DataFrame:
    """One row per (run, view) from every metrics.json below ``results_dir``."""
    rows = []
    for path in sorted(Path(results_dir).rglob(artifacts.METRICS)):
        summary = json.loads(path.read_text())
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
                    "view": view,
                    "accuracy": value["accuracy"],
                    "total": value["total"],
                    "source": str(path),
                }
            )
    return pd.DataFrame(rows)


def _method_label(method: str, formulation: str) -> str:
    return method if formulation == "paper" or method != "alignclip" else f"{method} ({formulation})"


def _fmt(mean: float | None, std: float | None = None) -> str:
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "—"
    return f"{mean:.1f} ± {std:.1f}" if std is not None and not np.isnan(std) else f"{mean:.1f}"


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


def to_markdown(table: pd.DataFrame) -> str:
    lines = ["| method | split | ours | paper | diff | seeds |", "|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        diff = "—" if r["diff"] is None or pd.isna(r["diff"]) else f"{r['diff']:+.1f}"
        std = None if r["ours_std"] is None or pd.isna(r["ours_std"]) else r["ours_std"]
        paper = None if r["paper"] is None or pd.isna(r["paper"]) else r["paper"]
        lines.append(f"| {r['method']} | {r['split']} | {_fmt(r['ours_mean'], std)} | {_fmt(paper)} | {diff} | {r['seeds']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ figures


def plot_similarity(matrix: np.ndarray, classes: list[str], path: str | Path) -> None:
    """Fig. 6: the row-softmaxed class similarity matrix."""
    n = len(classes)
    size = min(max(4.0, 0.35 * n + 2), 24)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="viridis")
    if n <= 60:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_title("class similarity (row softmax of text cosine)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_curves(logs: dict[str, pd.DataFrame], path: str | Path) -> None:
    columns = [c for c in ("loss", "cls_loss", "aal_attn", "aal_sim") if any(c in df for df in logs.values())]
    fig, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 3.2), squeeze=False)
    for ax, column in zip(axes[0], columns):
        for name, df in logs.items():
            if column in df and len(df):
                ax.plot(df["step"], df[column], label=name)
        ax.set_title(column)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attention_maps(checkpoints: dict[str, Path], prepared_dir: Path, test_domain: str | None, path: Path, count: int = 4) -> bool:
    """Fig. 1b/4/7/8: per image, each model's class-token attention (A_c) and token/text similarity (G), and the
    D-V branch's G_DV, upsampled over the image."""
    import torch

    from alignclip import losses
    from alignclip.data.images import ManifestImages, eval_transform
    from alignclip.data.prepare import load_prepared
    from alignclip.data.storage import open_image
    from alignclip.classifier import encode_classes, load_trained
    from alignclip.model import AlignCLIPVisual, attention_depth

    manifest, meta = load_prepared(prepared_dir)
    views = protocols.evaluation_views(manifest, meta, test_domain, "holdout")
    rows = views[0].rows.head(count)
    if rows.empty:
        return False
    panels = []
    for name, checkpoint in checkpoints.items():
        bundle, _, state = load_trained(checkpoint, "cpu")
        wrapped = AlignCLIPVisual(bundle.model.visual, aligned_layers=min(4, attention_depth(bundle.model.visual))).eval()
        space = views[0].label_space
        text = encode_classes(bundle.model, bundle.tokenizer, [meta["classes"][g] for g in space], meta["template"], "cpu")
        data = ManifestImages(meta, rows["path"].tolist(), rows["label"].tolist(), space, eval_transform(bundle.image_size, bundle.mean, bundle.std))
        images = torch.stack([data[i][0] for i in range(len(data))])
        targets = torch.tensor([data.targets[i] for i in range(len(data))])
        with torch.no_grad():
            out = wrapped(images, align=True)
            g = losses.token_text_similarity(out.tokens, text[targets])
            g_dv = losses.token_text_similarity(out.dv_tokens, text[targets])
        panels.append((name, out.cls_attn, g, g_dv))
    raw = [np.asarray(open_image(p)) for p in data.paths]
    columns = 1 + 2 * len(panels) + 1
    fig, axes = plt.subplots(len(raw), columns, figsize=(2.1 * columns, 2.1 * len(raw)), squeeze=False)
    grid = int(round(panels[0][1].shape[1] ** 0.5))
    for i, image in enumerate(raw):
        axes[i][0].imshow(image)
        axes[i][0].set_title(meta["classes"][rows["label"].iloc[i]], fontsize=7)
        col = 1
        for name, attn, g, g_dv in panels:
            for label, values in (("A_c", attn), ("G", g)):
                axes[i][col].imshow(image)
                axes[i][col].imshow(values[i].reshape(grid, grid).numpy(), cmap="jet", alpha=0.5,
                                    extent=(0, image.shape[1], image.shape[0], 0), interpolation="bilinear")
                axes[i][col].set_title(f"{name}: {label}", fontsize=7)
                col += 1
        axes[i][col].imshow(image)
        axes[i][col].imshow(panels[0][3][i].reshape(grid, grid).numpy(), cmap="jet", alpha=0.5,
                            extent=(0, image.shape[1], image.shape[0], 0), interpolation="bilinear")
        axes[i][col].set_title("G_DV (D-V branch)", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def top5_figure(with_sls: pd.DataFrame, without_sls: pd.DataFrame, classes: list[str], path: Path, count: int = 4) -> bool:
    """Fig. 4 (top row): top-5 predicted classes of the same images by a model with and one without SLS."""
    common = with_sls.merge(without_sls, on=["view", "path"], suffixes=("_sls", "_plain")).head(count)
    if common.empty:
        return False
    fig, axes = plt.subplots(len(common), 2, figsize=(8, 1.8 * len(common)), squeeze=False)
    for i, (_, r) in enumerate(common.iterrows()):
        for j, (suffix, title) in enumerate((("_plain", "without SLS"), ("_sls", "with SLS"))):
            top = [int(x) for x in str(r["top5" + suffix]).split(",")]
            probs = [float(x) for x in str(r["top5_prob" + suffix]).split(",")]
            names = [classes[t] for t in top]
            colors = ["tab:green" if t == r["label_sls"] else "tab:gray" for t in top]
            axes[i][j].barh(range(len(top))[::-1], probs, color=colors)
            axes[i][j].set_yticks(range(len(top))[::-1], names, fontsize=7)
            axes[i][j].set_xlim(0, 1)
            axes[i][j].set_xlabel("probability", fontsize=7)
            axes[i][j].set_title(f"{title} (true: {classes[int(r['label_sls'])]})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------ the page


def build_report(results_dir, out_dir, prepared_dir=None, similarity_dir=None) -> Path:
    """Write the report into a staging folder that then replaces ``out_dir`` whole (no stale table or figure of
    an earlier report stays beside the new ones; a failure leaves the previous report). A non-empty folder that
    is not a report of ours (no report.json) is refused, so nothing of the user's is replaced."""
    from alignclip.files import stage_output

    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").is_file():
        raise FileExistsError(f"{out} is not empty and holds no report.json: choose an empty or new folder for the report")
    with stage_output(out, "report", allowed=None) as staging:
        _build_report(Path(results_dir), staging, prepared_dir, similarity_dir)
    return out / artifacts.REPORT_PAGE


def _build_report(results_dir: Path, out: Path, prepared_dir=None, similarity_dir=None) -> Path:
    results = collect(results_dir)
    if results.empty:
        raise FileNotFoundError(f"no metrics.json below {results_dir}: run `alignclip evaluate` first")
    results.to_csv(out / "results_long.csv", index=False)
    summary = summarise(results)
    summary.to_csv(out / "summary.csv", index=False)
    tables = build_tables(summary)
    sections = ["# AlignCLIP results\n", f"Runs: {results['source'].nunique()} evaluations from `{results_dir}`.\n"]
    splits = sorted({s for s in results["test_split"].unique() if s})
    if splits:
        sections.append(
            "Held-out domain test set: " + ", ".join(splits)
            + " (`holdout`: the held-out domain's 20% split, CLIPood's protocol; `in`: its 80% split, what DomainBed reports;"
            " `full`: the whole domain).\n"
        )
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
        markdown = to_markdown(table)
        (out / f"{name}.md").write_text(markdown)
        sections.append(f"## {name}\n\n{markdown}")
    figures = []
    if similarity_dir and (Path(similarity_dir) / artifacts.SIMILARITY_HEATMAP).exists():
        target = out / artifacts.SIMILARITY_HEATMAP
        target.write_bytes((Path(similarity_dir) / artifacts.SIMILARITY_HEATMAP).read_bytes())
        figures.append(("Class similarity matrix (fig. 6)", target.name))
    logs = {}
    for log_path in sorted(results_dir.rglob(artifacts.TRAIN_LOG)):
        frame = pd.read_csv(log_path)
        if len(frame):
            logs[str(log_path.parent.relative_to(results_dir))] = frame
    if logs:
        plot_training_curves(logs, out / "training_curves.png")
        figures.append(("Training curves", "training_curves.png"))
    checkpoints = {}
    for ckpt in sorted(results_dir.rglob(artifacts.MODEL)):
        method = json.loads((ckpt.parent / artifacts.TRAIN_SUMMARY).read_text())["method"]["name"] if (ckpt.parent / artifacts.TRAIN_SUMMARY).exists() else ckpt.parent.name
        checkpoints.setdefault(method, ckpt)
    if prepared_dir and checkpoints:
        chosen = {k: checkpoints[k] for k in ("zeroshot", "alignclip", "erm") if k in checkpoints} or dict(list(checkpoints.items())[:2])
        first = results[results["test_domain"] != ""]["test_domain"]
        domain = first.iloc[0] if not first.empty else None
        if attention_maps(chosen, Path(prepared_dir), domain, out / "attention_maps.png"):
            figures.append(("Class-token attention A_c and token/text similarity G, zero-shot vs fine-tuned; G_DV of the D-V branch (fig. 1b, 4, 7, 8)", "attention_maps.png"))
    predictions = {}
    for pred in sorted(results_dir.rglob(artifacts.PREDICTIONS)):
        metrics = json.loads((pred.parent / artifacts.METRICS).read_text())
        predictions.setdefault(metrics["method"], pred)
    if prepared_dir and "alignclip" in predictions and ("erm" in predictions or "clipood" in predictions):
        meta = json.loads((Path(prepared_dir) / artifacts.META).read_text())
        baseline = predictions.get("erm", predictions.get("clipood"))
        if top5_figure(pd.read_parquet(predictions["alignclip"]), pd.read_parquet(baseline), meta["classes"], out / "top5.png"):
            figures.append(("Top-5 predictions without SLS (ERM) and with SLS (AlignCLIP) (fig. 4)", "top5.png"))
    for title, name in figures:
        sections.append(f"## {title}\n\n![{title}]({name})\n")
    page = "\n".join(sections)
    (out / artifacts.REPORT_MARKDOWN).write_text(page)
    (out / artifacts.REPORT_PAGE).write_text(_html(sections, tables, figures))
    (out / "report.json").write_text(json.dumps({"tables": list(tables), "figures": [f for _, f in figures]}, indent=2) + "\n")
    log.info("report: %d tables, %d figures -> %s", len(tables), len(figures), out / artifacts.REPORT_PAGE)
    return out / artifacts.REPORT_PAGE


def _html(sections, tables, figures) -> str:
    body = ["<h1>AlignCLIP results</h1>"]
    for name, table in tables.items():
        body.append(f"<h2>{html.escape(name)}</h2>")
        body.append(table.to_html(index=False, na_rep="—", border=0))
    for title, name in figures:
        body.append(f"<h2>{html.escape(title)}</h2><img src='{html.escape(name)}' style='max-width:100%'>")
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto} table{border-collapse:collapse} td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>AlignCLIP results</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
