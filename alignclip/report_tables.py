"""The report's tables in the paper's shape (rows: methods, columns: held-out domains or datasets and Avg), and
every method's paired difference to ERM and to zero-shot with its bootstrap interval (alignclip.stats).

Input: the long table of one (dataset, protocol) that its protocol shapes (``protocol.table_rows``: method, split,
ours_mean, ours_std, seeds, paper) and the reported cells' rows of ``report.collect`` (their predictions.parquet
beside each metrics.json give the per-image correctness the intervals are computed from).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from alignclip import artifacts, protocols, stats
from alignclip.protocols.base import ordered_labels

BASELINES = (("erm", "ERM"), ("zeroshot", "zero-shot"))
AVG = "Avg"


def column_label(test_domain: str, view: str) -> str:
    """The long table's ``split`` for a (held-out domain, view): as the protocols name their rows."""
    if view == "test":
        return test_domain or "test"
    return f"{test_domain} ({view})" if test_domain else view


def _fmt(value, std=None) -> str:
    if value is None or pd.isna(value):
        return "—"
    return f"{value:.1f} ± {std:.1f}" if std is not None and not pd.isna(std) else f"{value:.1f}"


def wide_accuracy(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per method, one column per split of the long table (in its order) and the seeds;
    each cell ``mean ± std`` over seeds, the paper's number beside it in parentheses where it has one."""
    columns = list(dict.fromkeys(table["split"]))
    rows = []
    for method in dict.fromkeys(table["method"]):
        mine = table[table["method"] == method].drop_duplicates("split").set_index("split")
        cells = []
        for column in columns:
            if column not in mine.index:
                cells.append("—")
                continue
            r = mine.loc[column]
            paper = "" if r["paper"] is None or pd.isna(r["paper"]) else f" ({r['paper']:.1f})"
            cells.append(_fmt(r["ours_mean"], r["ours_std"]) + paper)
        seeds = mine["seeds"].astype(int)
        runs = "1 run" if seeds.max() == 1 else (f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}")
        rows.append([str(method), *cells, runs])
    return ["method", *columns, "seeds"], rows


def _correctness(source: str, view: str) -> pd.Series | None:
    """Per test image (index: its path, the image's identity in the manifest), 1 if the cell predicted it right."""
    path = Path(source).parent / artifacts.PREDICTIONS
    if not path.is_file():
        return None
    frame = pd.read_parquet(path, columns=["view", "path", "label", "pred"])
    frame = frame[frame["view"] == view]
    if frame["path"].duplicated().any():
        raise ValueError(f"{path}: image paths repeat in view {view!r}; cannot pair images across methods")
    return pd.Series((frame["pred"] == frame["label"]).to_numpy(dtype=np.int8), index=frame["path"].to_numpy())


def correctness_matrices(results: pd.DataFrame, columns: list[str]) -> dict[tuple[str, str], pd.DataFrame]:
    """(variant, column) -> per-image correctness, one column per seed; only cells whose predictions exist."""
    found: dict[tuple[str, str], dict] = {}
    for _, r in results.iterrows():
        column = column_label(r["test_domain"], r["view"])
        if column not in columns:
            continue
        correct = _correctness(r["source"], r["view"])
        if correct is not None:
            found.setdefault((r["variant"], column), {})[r["seed"]] = correct
    return {key: pd.DataFrame(seeds).dropna() for key, seeds in found.items()}


def _pair(method: pd.DataFrame, baseline: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    common = method.index[method.index.isin(baseline.index)]
    if not len(common):
        return None
    return method.loc[common].to_numpy().T, baseline.loc[common].to_numpy().T


def differences(results: pd.DataFrame, table: pd.DataFrame, key: str, headline_view: str) -> pd.DataFrame:
    """Every method's difference to each baseline per column of ``table`` (held-out domains) and on its Avg
    (average over the domains, resampled within each): method, baseline, column, diff, low, high, images, significant."""
    columns = [c for c in dict.fromkeys(table["split"]) if c != AVG]
    matrices = correctness_matrices(results, columns)
    domains = {column_label(d, headline_view) for d in results["test_domain"].unique() if d} & set(columns)
    rows = []
    for baseline, _ in BASELINES:
        for method in ordered_labels({v for v, _ in matrices} - {baseline}):
            pairs = {}
            for column in columns:
                if (method, column) in matrices and (baseline, column) in matrices:
                    pair = _pair(matrices[(method, column)], matrices[(baseline, column)])
                    if pair is not None:
                        rows.append((method, baseline, column, stats.paired_difference(*pair, f"{key}/{column}")))
                        if column in domains:
                            pairs[f"{key}/{column}"] = pair
            if AVG in set(table["split"]) and domains and len(pairs) == len(domains):
                rows.append((method, baseline, AVG, stats.averaged_difference(pairs)))
    return pd.DataFrame([{"method": m, "baseline": b, "column": c, "diff": d.diff, "low": d.low, "high": d.high,
                          "images": d.images, "significant": d.significant} for m, b, c, d in rows],
                        columns=["method", "baseline", "column", "diff", "low", "high", "images", "significant"])


def wide_differences(diffs: pd.DataFrame, baseline: str, columns: list[str]) -> tuple[list[str], list[list[str]]] | None:
    """Header and rows of one baseline's differences (``+5.0 [+1.2, +8.9]``, ``n.s.`` when 0 is inside); None if none."""
    mine = diffs[diffs["baseline"] == baseline]
    if mine.empty:
        return None
    shown = [c for c in columns if c in set(mine["column"])]
    rows = []
    for method in dict.fromkeys(mine["method"]):
        by_column = mine[mine["method"] == method].set_index("column")
        rows.append([method] + [stats.format_difference(stats.Difference(*(by_column.loc[c, f] for f in ("diff", "low", "high", "images"))))
                                if c in by_column.index else "—" for c in shown])
    return ["method", *shown], rows


def table_blocks(table: pd.DataFrame, diffs: pd.DataFrame) -> list[tuple[str, list[str], list[list[str]]]]:
    """The blocks shown for one results table: accuracies, then the differences to ERM and to zero-shot."""
    header, rows = wide_accuracy(table)
    blocks = [("Top-1 accuracy (%), mean ± std over seeds; in parentheses the paper's number", header, rows)]
    for baseline, name in BASELINES:
        wide = wide_differences(diffs, baseline, header[1:-1])
        if wide is not None:
            blocks.append((f"Difference to {name} (points), paired bootstrap 95% interval", *wide))
    return blocks


def blocks_markdown(blocks) -> str:
    parts = []
    for title, header, rows in blocks:
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        parts.append("\n".join(lines) + "\n")
    if len(blocks) > 1:
        parts.append(stats.NOT_SIGNIFICANT_NOTE + "\n")
    return "\n".join(parts)


def blocks_html(blocks) -> str:
    body = []
    for title, header, rows in blocks:
        body.append(f"<p><b>{html.escape(title)}</b></p><table><thead><tr>"
                    + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr></thead><tbody>")
        body += ["<tr>" + "".join(f"<td>{html.escape(cell, quote=False)}</td>" for cell in row) + "</tr>" for row in rows]
        body.append("</tbody></table>")
    if len(blocks) > 1:
        body.append(f"<p class='caption'>{html.escape(stats.NOT_SIGNIFICANT_NOTE, quote=False)}</p>")
    return "".join(body)


def scores(table: pd.DataFrame, diffs: pd.DataFrame) -> dict:
    """method -> column -> numbers, for `dvc metrics show` and the MLflow parent run: acc_mean, acc_std, seeds,
    paper, and vs_<baseline> / vs_<baseline>_low / vs_<baseline>_high (points). No None: absent values are left out."""
    out: dict[str, dict] = {}
    for _, r in table.iterrows():
        cell = {"acc_mean": r["ours_mean"], "acc_std": r["ours_std"], "seeds": r["seeds"], "paper": r["paper"]}
        out.setdefault(str(r["method"]), {})[str(r["split"])] = {k: float(v) for k, v in cell.items() if v is not None and not pd.isna(v)}
    for _, d in diffs.iterrows():
        cell = out.setdefault(str(d["method"]), {}).setdefault(str(d["column"]), {})
        prefix = f"vs_{d['baseline']}"
        cell.update({prefix: round(float(d["diff"]), 3), f"{prefix}_low": round(float(d["low"]), 3),
                     f"{prefix}_high": round(float(d["high"]), 3)})
    return out


def headline_view(protocol_name: str) -> str:
    """The view whose accuracy the protocol's Avg averages over domains (``test_acc`` -> ``test``)."""
    metric = protocols.get_protocol(protocol_name).headline_metric
    return metric[: -len("_acc")] if metric.endswith("_acc") else metric


def avg_std(results: pd.DataFrame, domains: list[str], view: str) -> float | None:
    """Std over seeds of the per-seed average over ``domains`` (every seed must have them all); None below 2 seeds."""
    part = results[(results["view"] == view) & results["test_domain"].isin(domains)]
    per_seed = part.pivot_table(index="seed", columns="test_domain", values="accuracy", aggfunc="mean")
    per_seed = per_seed.dropna()
    if len(per_seed) < 2 or per_seed.shape[1] != len(domains):
        return None
    return float(per_seed.mean(axis=1).std(ddof=1))
