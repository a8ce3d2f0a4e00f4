"""From settings to a pipeline's arguments, once: what a pipeline's parameters are (``pipeline_arguments``), their
descriptions (``PARAMETER_HELP``), and the settings a composite takes (``resolve_pipeline``).

The compiled package's parameter defaults, the arguments `pipeline submit` sends, those `pipeline run` passes to
the local runner, each sub-pipeline's arguments inside a composite and what `--dry-run` prints all come from
``pipeline_arguments``. No kfp here.
"""

from __future__ import annotations

from pathlib import Path

from alignclip.config import BY_NAME, COMPOSITES, ConfigError, check_family, effective_train, grid, resolve

COMPOSITE_SETTINGS = ("mlflow_tracking_uri", "data_root")


def resolve_pipeline(family: str, params_file: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Resolved settings of a family (a composite such as ``all``: the MLflow server and the data prefix, shared by
    every sub-pipeline; each dataset is a folder under the prefix)."""
    if family in COMPOSITES:
        extra = sorted(set(overrides or {}) - set(COMPOSITE_SETTINGS))
        if params_file is not None or extra:
            raise ConfigError(f"the {family} pipeline takes only --data-root (a prefix: <prefix>/<dataset>) and "
                              f"mlflow_tracking_uri (got {extra or '--params-file'}); compile or submit a family to "
                              "change its settings")
        return {"mlflow_tracking_uri": (overrides or {}).get("mlflow_tracking_uri", ""),
                "data_root": (overrides or {}).get("data_root") or None}
    check_family(family)
    return resolve(family, params_file, overrides)


def pipeline_arguments(family: str, values: dict) -> dict:
    """Resolved settings (``resolve_pipeline``) as the pipeline's parameters: the grid's lists become
    ``train_grid``, and the training settings are the effective ones (recipe applied), so nothing is left to a
    default inside a task. ``train_steps`` is 0 only when the length is ``train_epochs`` passes over the data.
    A composite's one parameter is the MLflow server (its data prefix is compiled into the sub-pipelines)."""
    if family in COMPOSITES:
        return {"mlflow_tracking_uri": values.get("mlflow_tracking_uri", "")}
    train = effective_train(values)
    return {
        "data_dataset": values["data_dataset"],
        "data_root": values["data_root"],
        "data_protocol": values["data_protocol"],
        "data_holdout_fraction": values["data_holdout_fraction"],
        "data_trial_seed": values["data_trial_seed"],
        "data_shots": values["data_shots"],
        "data_templates": values["data_templates"],
        "data_class_names": values["data_class_names"],
        "data_listing": values["data_listing"],
        "data_test_split": values["data_test_split"],
        "model_name": values["model_name"],
        "model_pretrained": values["model_pretrained"],
        "train_recipe": values["train_recipe"],
        "train_formulation": values["train_formulation"],
        "train_grid": grid(values),
        "train_seeds": [int(s) for s in values["train_seeds"]],
        "train_steps": int(train["steps"] or 0),
        "train_epochs": int(train["epochs"] or 0),
        "train_batch_size": int(train["batch_size"]),
        "train_lr": float(train["lr"]),
        "train_hflip": bool(train["hflip"]),
        "mlflow_tracking_uri": values["mlflow_tracking_uri"],
        "mlflow_experiment": values["mlflow_experiment"],
    }


PARAMETER_HELP = {
    **{name: setting.help for name, setting in BY_NAME.items()},
    "train_grid": "cells {method, test_domain, seed, hparams, name}: train.methods x train.grid x train.test_domains x train.seeds (zero-shot once per domain, seed null)",
    "train_seeds": "seeds of the grid; also the few-shot sampling seeds of prepare",
    "train_steps": "optimiser steps (the recipe's unless set); 0: the length is train_epochs passes over the data",
    "train_epochs": "passes over the training set when train_steps is 0",
    "train_batch_size": "images per training domain and step (the recipe's unless set)",
    "train_lr": "peak learning rate (the recipe's unless set)",
    "train_hflip": "random horizontal flip (the recipe's unless set)",
}
