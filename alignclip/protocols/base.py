"""What every benchmark protocol answers, and the helpers its results table uses.

The manifest holds global labels (indices into ``meta["classes"]``); a *label space* is the ordered list of
global classes a classifier scores against. A protocol turns (prepared dataset, held-out domain, seed) into
training rows and evaluation views, names its headline metric, and shapes its results table beside the paper's
numbers, so train, evaluate, report and the pipelines agree without knowing which protocol they run.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `alignclip --help` reads the protocol names without loading pandas (slow)
    import pandas as pd

PAPER_RESULTS = Path(__file__).resolve().parent.parent / "resources" / "paper_results.json"
TEST_SPLITS = ("holdout", "in", "full")
METHOD_ORDER = ["zeroshot", "erm", "clipood", "alignclip"]


@dataclass
class View:
    name: str
    rows: pd.DataFrame
    label_space: list[int]


@functools.lru_cache(maxsize=1)
def paper_results() -> dict:
    """The published numbers (resources/paper_results.json), one section per protocol."""
    return json.loads(PAPER_RESULTS.read_text())


class Protocol:
    """One benchmark protocol. Subclasses set the class attributes and the methods marked as theirs."""

    name: str = ""
    description: str = ""
    held_out_domain: bool = False  # a run leaves one domain out: its test domain must be named
    group_key: str | None = None  # balanced batches: one stream (batch_size images) per value of this column
    uses_test_split: bool = False  # the held-out domain's images can be scored as holdout / in / full
    headline_metric: str = ""  # the number a run is summed up by (a view's accuracy "<view>_acc", or a derived one)
    table_prefix: str = ""  # results table name: <table_prefix>_<dataset>
    paper_section: str = ""  # section of paper_results.json with this protocol's published numbers
    recipe: str = "paper"  # the benchmark's recipe for a dataset (recipes.py), if it exists: "domain_shift/{dataset}"
    layouts: tuple[str, ...] = ()  # dataset layouts (data.registry: domainbed, coop, imagenet) it can be prepared from

    # --- theirs ---------------------------------------------------------------------------------------

    def training_set(
        self, manifest: pd.DataFrame, meta: dict, test_domain: str | None, seed: int, shots: int | None = None
    ) -> tuple[pd.DataFrame, list[int]]:
        raise NotImplementedError

    def evaluation_views(self, manifest: pd.DataFrame, meta: dict, test_domain: str | None, test_split: str) -> list[View]:
        raise NotImplementedError

    def table_rows(self, dataset: str, part: pd.DataFrame) -> list[dict]:
        """Rows of the results table from ``part``: one (dataset, protocol)'s summary (report.summarise)."""
        raise NotImplementedError

    def derived_metrics(self, views: dict[str, dict]) -> dict[str, float]:
        """Metrics computed from the views' accuracies (base-to-new's H); none by default."""
        return {}

    # --- shared ---------------------------------------------------------------------------------------

    def check_test_domain(self, meta: dict, test_domain: str | None) -> None:
        if self.held_out_domain and test_domain not in meta["domains"]:
            raise ValueError(f"test domain {test_domain!r}: expected one of {meta['domains']} ({meta['dataset']})")

    def paper(self, dataset: str | None = None) -> dict:
        section = paper_results().get(self.paper_section, {})
        return section if dataset is None else section.get(dataset, {})

    def headline(self, summary: dict) -> tuple[str, float] | None:
        """(metric name, value) of an evaluation summary (metrics.json); None when its view had no images."""
        name = self.headline_metric
        view = name[: -len("_acc")] if name.endswith("_acc") else None
        if view is not None and view in summary["views"]:
            return name, float(summary["views"][view]["accuracy"])
        if name in summary:
            return name, float(summary[name])
        return None


def ordered_labels(labels) -> list[str]:
    """Row labels of a table: the paper's methods in its order, then the rest (ablations, formulations) by name."""
    return sorted(labels, key=lambda m: (METHOD_ORDER.index(m.split(" ")[0]) if m.split(" ")[0] in METHOD_ORDER else 99, m))


def paper_value(entry) -> float | None:
    """A published number: ``[mean, std]`` or ``mean`` -> mean; absent -> None."""
    if entry is None:
        return None
    return float(entry[0] if isinstance(entry, list) else entry)


def table_row(method, column, mean, std, published, seeds) -> dict:
    import numpy as np

    return {
        "method": method,
        "split": column,
        "ours_mean": round(float(mean), 2),
        "ours_std": None if std is None or np.isnan(std) else round(float(std), 2),
        "seeds": int(seeds),
        "paper": published,
        "diff": None if published is None else round(float(mean) - published, 2),
    }


def few_shot(manifest: pd.DataFrame, seed: int, shots: int | None = None, meta: dict | None = None) -> pd.Series:
    """The few-shot rows sampled at preparation for a seed (column ``shots_seed<k>``); with ``shots`` 0 every row
    (the authors' base-to-new scripts train on all base images: main.py ``--n-shot 0``)."""
    import pandas as pd

    if shots == 0:
        return pd.Series(True, index=manifest.index)
    prepared = (meta or {}).get("settings", {}).get("shots")
    if shots is not None and shots != prepared:
        raise ValueError(
            f"shots={shots}: the data was prepared with {prepared} shots per class; prepare with --shots {shots} "
            f"or train with shots 0 (all training images)"
        )
    column = f"shots_seed{seed}"
    if column not in manifest:
        seeds = sorted(int(c[len("shots_seed") :]) for c in manifest.columns if c.startswith("shots_seed"))
        raise ValueError(f"seed {seed} was not sampled at preparation (prepared seeds: {seeds}); re-run prepare with it")
    return manifest[column]
