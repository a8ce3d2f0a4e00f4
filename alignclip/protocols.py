"""What each benchmark protocol trains on and evaluates, and over which label space.

The manifest holds global labels (indices into ``meta["classes"]``); a *label space* is the ordered list of
global classes a classifier scores against. This module is the one place that turns (protocol, held-out
domain, seed) into training rows and evaluation views, so train, evaluate and report agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass
class View:
    name: str
    rows: pd.DataFrame
    label_space: list[int]


def _shots(manifest: pd.DataFrame, seed: int) -> pd.Series:
    column = f"shots_seed{seed}"
    if column not in manifest:
        seeds = sorted(int(c[len("shots_seed") :]) for c in manifest.columns if c.startswith("shots_seed"))
        raise ValueError(f"seed {seed} was not sampled at preparation (prepared seeds: {seeds}); re-run prepare with it")
    return manifest[column]


def check_test_domain(meta: dict, test_domain: str | None) -> None:
    if meta["protocol"] in ("domainbed", "wild"):
        if test_domain not in meta["domains"]:
            raise ValueError(f"test domain {test_domain!r}: expected one of {meta['domains']} ({meta['dataset']})")


def few_shot_rows(train: pd.DataFrame, meta: dict, seed: int, shots: int | None) -> pd.Series:
    """Which training rows a few-shot protocol trains on: ``shots`` None (or the prepared count) the subset sampled
    at preparation for ``seed``; 0 every training image (the authors' base-to-new scripts: ``--n-shot 0``)."""
    if shots == 0:
        return pd.Series(True, index=train.index)
    prepared = meta.get("settings", {}).get("shots")
    if shots is not None and shots != prepared:
        raise ValueError(
            f"shots={shots}: the data was prepared with {prepared} shots per class; prepare with --shots {shots} "
            f"or train with shots 0 (all training images)"
        )
    return _shots(train, seed)


def training_set(
    manifest: pd.DataFrame, meta: dict, test_domain: str | None, seed: int, shots: int | None = None
) -> tuple[pd.DataFrame, list[int]]:
    protocol = meta["protocol"]
    check_test_domain(meta, test_domain)
    train = manifest[manifest["split"] == "train"]
    if protocol == "domainbed":
        return train[train["domain"] != test_domain], list(range(len(meta["classes"])))
    if protocol == "wild":
        rows = train[(train["domain"] != test_domain) & (train["subset"] == "base")]
        return rows, list(meta["base_classes"])
    if protocol == "base2new":
        rows = train[few_shot_rows(train, meta, seed, shots) & (train["subset"] == "base")]
        return rows, list(meta["base_classes"])
    if protocol == "imagenet":
        rows = train[(train["domain"] == "imagenet") & few_shot_rows(train, meta, seed, shots)]
        return rows, list(range(len(meta["classes"])))
    raise ValueError(f"unknown protocol {protocol!r}")


def evaluation_views(manifest: pd.DataFrame, meta: dict, test_domain: str | None, test_split: str = "holdout") -> list[View]:
    """The splits a trained model is scored on. ``test_split`` (domainbed protocol) picks the held-out domain's
    images: ``holdout`` (default, CLIPood: its 20% "out" split), ``in`` (its 80% "in" split, what DomainBed's
    model selection reports as ``env{i}_in_acc``) or ``full`` (the whole domain)."""
    protocol = meta["protocol"]
    check_test_domain(meta, test_domain)
    everything = list(range(len(meta["classes"])))
    if test_split not in ("holdout", "in", "full"):
        raise ValueError(f"test_split={test_split!r}: expected 'holdout', 'in' or 'full'")
    if protocol in ("domainbed", "wild"):
        target = manifest[manifest["domain"] == test_domain]
        if protocol == "domainbed":
            if test_split == "holdout":
                target = target[target["split"] == "val"]
            elif test_split == "in":
                target = target[target["split"] == "train"]
            sources = manifest[(manifest["domain"] != test_domain) & (manifest["split"] == "val")]
            return [View("test", target, everything), View("source_val", sources, everything)]
        # CLIPood in the wild: target base and open classes, in and out splits, against all classes (base then new)
        return [
            View("base", target[target["subset"] == "base"], everything),
            View("new", target[target["subset"] == "new"], everything),
            View("all", target, everything),
        ]
    if protocol == "base2new":
        test = manifest[manifest["split"] == "test"]
        return [
            View("base", test[test["subset"] == "base"], list(meta["base_classes"])),
            View("new", test[test["subset"] == "new"], list(meta["new_classes"])),
        ]
    if protocol == "imagenet":
        views = []
        for domain in sorted(manifest["domain"].unique()):
            rows = manifest[(manifest["domain"] == domain) & (manifest["split"] == "test")]
            space = meta.get("label_subsets", {}).get(domain, everything)
            views.append(View(domain, rows, list(space)))
        return views
    raise ValueError(f"unknown protocol {protocol!r}")
