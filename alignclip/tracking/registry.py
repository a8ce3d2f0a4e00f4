"""The MLflow model registry: one registered model per (dataset, method variant), one version per grid cell, its
description and tags, and the ``best-<held-out domain>-<split>`` alias.

The alias follows the project's model-selection rule (training-domain validation, ``alignclip.selection``): the
version with the best source-validation accuracy. It never reads a test accuracy: a version whose protocol has no
source-validation view (wild, base-to-new, ImageNet) gets no alias, as selection chooses nothing there.
"""

from __future__ import annotations

import re

from alignclip.log import get_logger
from alignclip.tracking.client import _client

log = get_logger(__name__)


def validation_tag() -> str:
    """The version tag of its source-validation accuracy, what the alias is chosen by (selection's view name;
    imported here, not at the top: alignclip.selection loads pandas, and the tracking package loads nothing heavy)."""
    from alignclip.selection import VALIDATION_VIEW

    return f"{VALIDATION_VIEW}_acc_pct"


def registered_name(dataset: str, variant: str) -> str:
    """``alignclip-<dataset>-<variant>`` in the registry's characters: ``alignclip[aal=False]`` becomes
    ``alignclip-aal-false`` (no run of hyphens, none at the end)."""
    variant = re.sub(r"=(True|False)\b", lambda switch: "=" + switch.group(1).lower(), variant)
    name = re.sub(r"[^\w\-.]+", "-", f"{dataset}-{variant}").strip("-")
    return "alignclip-" + re.sub(r"-{2,}", "-", name)


def alias_for(test_domain: str | None, test_split: str | None) -> str:
    """The registry alias of the best version per held-out domain (aliases allow letters, digits, _ and -)."""
    parts = ["best"] + [p for p in (test_domain, test_split) if p]
    return re.sub(r"[^\w\-]", "_", "-".join(parts))


def describe_registered_model(name: str, version, tags: dict, classes: list[str], uri: str | None = None) -> None:
    """After a cell's model was logged: the registered model gets the cell's tags and its description, the new
    ``version`` (None: not registered) its held-out domain, seed and classes."""
    client = _client(uri)
    model_tags = {k: tags[k] for k in ("dataset", "protocol", "method", "variant", "formulation")}
    for key, value in model_tags.items():
        client.set_registered_model_tag(name, key, value)
    client.update_registered_model(
        name,
        description=(
            f"{tags['variant']} (formulation: {tags['formulation']}) fine-tuned on {tags['dataset']} "
            f"({tags['protocol']}). One version per grid cell (held-out domain, seed); the alias "
            "`best-<held-out domain>-<split>` marks the version of best source-validation accuracy (training-domain "
            "validation). Input: float32 images [N, 3, H, W]; output: class probabilities [N, C] over the version's "
            "`classes`."
        ),
    )
    if version is not None:
        version_tags = {**model_tags, "held_out_domain": tags["held_out_domain"], "seed": tags["seed"], "classes": ",".join(classes)}
        for key, value in version_tags.items():
            client.set_model_version_tag(name, str(version), key, str(value)[:5000])


def describe_model_version(run_id: str, summary: dict, uri: str | None = None) -> None:
    """After evaluation: the registered version of this cell's model gets its accuracies, split and description."""
    try:
        _describe_model_version(run_id, summary, uri)
    except Exception as err:  # noqa: BLE001 - the metrics are on disk; tracking must not cost them
        log.warning("could not describe the registered model of run %s (%s)", run_id, str(err).splitlines()[0][:200])


def _describe_model_version(run_id: str, summary: dict, uri: str | None) -> None:
    from alignclip.selection import VALIDATION_VIEW

    client = _client(uri)
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    test = summary["views"].get("test") or next(iter(summary["views"].values()), None)
    validation = summary["views"].get(VALIDATION_VIEW)
    for version in versions:
        if test is not None:
            client.set_model_version_tag(version.name, version.version, "test_acc_pct", f"{test['accuracy']:.2f}")
            client.set_model_version_tag(version.name, version.version, "test_images", str(test["total"]))
        if validation is not None:
            client.set_model_version_tag(version.name, version.version, validation_tag(), f"{validation['accuracy']:.2f}")
        client.set_model_version_tag(version.name, version.version, "test_split", str(summary.get("test_split") or "-"))
        accuracy = f"{test['accuracy']:.1f}% top-1 on {test['total']} test images" if test is not None else "not evaluated"
        where = f"held-out domain {summary['test_domain']}" if summary.get("test_domain") else "its protocol's test set"
        client.update_model_version(
            version.name,
            version.version,
            description=(
                f"{summary['variant']} (formulation: {summary['formulation']}) fine-tuned on {summary['dataset']} "
                f"({summary['protocol']}), seed {summary['seed']}: {accuracy} ({where}, split "
                f"{summary.get('test_split') or '-'}). Input: float32 images [N, 3, H, W], normalised as the "
                "CLIP preset; output: class probabilities [N, C] over the training label space (tag `classes`)."
            ),
        )


def set_best_aliases(dataset: str, uri: str | None = None) -> None:
    """Alias ``best-<held-out domain>-<split>`` on the version of best source-validation accuracy of each registered
    model of a dataset (ties: the earlier version). Test accuracies are not read."""
    client = _client(uri)
    tag = validation_tag()
    prefix = registered_name(dataset, "")
    for model in client.search_registered_models(filter_string=f"name LIKE '{prefix}%'"):
        best: dict[str, tuple[float, str]] = {}
        for version in client.search_model_versions(f"name = '{model.name}'"):
            if tag not in version.tags:
                continue
            alias = alias_for(version.tags.get("held_out_domain", "-").strip("-"), version.tags.get("test_split", "").strip("-"))
            accuracy = float(version.tags[tag])
            if alias not in best or (accuracy, -int(version.version)) > (best[alias][0], -int(best[alias][1])):
                best[alias] = (accuracy, version.version)
        for alias, (_, version) in best.items():
            client.set_registered_model_alias(model.name, alias, version)
