"""Model selection by training-domain validation (DomainBed's rule): per (method, held-out domain), the
hyper-parameter setting with the best mean source-validation accuracy over seeds is the one reported.

Cells of one (method, held-out domain) differ in ``hparams`` (the grid's varied settings, in train.json and
metrics.json; absent or empty when nothing varies) and in seed. ``choose_settings`` is given the source-validation
accuracies and nothing else (``validation_scores`` builds its input, and it holds no test number), so what is
reported can never depend on a test image. A protocol without a source-validation view (wild, base-to-new,
ImageNet) selects nothing: each setting keeps its own row, labelled with its hyper-parameters.
"""

from __future__ import annotations

import json

import pandas as pd

VALIDATION_VIEW = "source_val"
GROUP = ["dataset", "protocol", "variant", "test_domain"]  # one choice per (method, held-out domain)
VALIDATION_COLUMNS = GROUP + ["hparams", "seed", "accuracy"]


def hparams_key(hparams: dict | None) -> str:
    """A setting's canonical text (sorted JSON): equal settings compare equal, whatever their key order."""
    return json.dumps(hparams or {}, sort_keys=True)


def describe(key: str) -> str:
    """``lr=0.001, aal_weight=0.5``; ``-`` when nothing varies."""
    values = json.loads(key)
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "-"


def validation_scores(results: pd.DataFrame) -> pd.DataFrame:
    """Only the source-validation accuracies of ``results`` (report.collect), one row per cell: what selection may see."""
    rows = results[results["view"] == VALIDATION_VIEW]
    return rows[VALIDATION_COLUMNS].reset_index(drop=True)


def choose_settings(validation: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, protocol, variant, held-out domain) and setting: mean source-validation accuracy over
    seeds, the number of seeds and ``chosen`` (the best mean; ties go to the first setting in sorted order)."""
    if set(validation.columns) != set(VALIDATION_COLUMNS):
        raise ValueError(f"selection reads source-validation scores only: expected columns {VALIDATION_COLUMNS}")
    searched = (validation.groupby(GROUP + ["hparams"], dropna=False)["accuracy"]
                .agg(val_mean="mean", val_seeds="count").reset_index()
                .sort_values(GROUP + ["hparams"], kind="stable").reset_index(drop=True))
    best = searched.groupby(GROUP, dropna=False)["val_mean"].transform("max")
    first = searched[searched["val_mean"] == best].groupby(GROUP, dropna=False).head(1).index
    searched["chosen"] = searched.index.isin(first)
    return searched


def select(results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the reported cells' rows of ``results``, the selection table). Groups without source-validation numbers
    keep every setting, their variant labelled with it when more than one setting was run."""
    searched = choose_settings(validation_scores(results))
    chosen = searched[searched["chosen"]][GROUP + ["hparams"]]
    keyed = results.merge(chosen.assign(_chosen=True), on=GROUP + ["hparams"], how="left")
    validated = keyed.merge(chosen[GROUP].assign(_validated=True), on=GROUP, how="left")
    kept = validated[validated["_chosen"].eq(True) | validated["_validated"].isna()].copy()
    settings = kept.groupby(GROUP, dropna=False)["hparams"].transform("nunique")
    unselected = kept["_validated"].isna() & (settings > 1)
    kept.loc[unselected, "variant"] = kept.loc[unselected, "variant"] + " {" + kept.loc[unselected, "hparams"].map(describe) + "}"
    return kept.drop(columns=["_chosen", "_validated"]).reset_index(drop=True), searched


def selection_summary(searched: pd.DataFrame) -> tuple[str, list[str], list[list[str]]]:
    """The page's account of the search: a statement, and every setting's mean source-validation accuracy with the
    chosen one marked (no rows when nothing varied)."""
    if searched.empty or (searched.groupby(GROUP, dropna=False)["hparams"].nunique() <= 1).all():
        return "No hyper-parameter grid: one setting per method and held-out domain, so nothing was selected.", [], []
    statement = ("Hyper-parameters chosen by training-domain validation (DomainBed): per method and held-out domain, "
                 f"the setting with the best mean `{VALIDATION_VIEW}` accuracy over seeds is the one reported; test "
                 "accuracy is never read to choose. Searched settings:")
    header = ["method", "held-out domain", "setting", "source-val acc (%)", "seeds", "chosen"]
    rows = [[str(r["variant"]), r["test_domain"] or "-", describe(r["hparams"]), f"{r['val_mean']:.1f}",
             str(int(r["val_seeds"])), "chosen" if r["chosen"] else ""] for _, r in searched.iterrows()]
    return statement, header, rows
