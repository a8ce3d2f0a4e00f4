"""The `alignclip` command line of each stage, built in one place: `alignclip grid` (the DVC stages) runs the
train and evaluate commands of its cells in-process, the KFP components (alignclip_kfp.components) run all five as
subprocesses, and `alignclip pipeline ... --dry-run` prints them.

Plain lists of strings, no kfp: the library's own grid needs them, so they live in the library, and the KFP layer
(which the library never imports) builds on them.
"""

from __future__ import annotations

import json

from alignclip.config import DEFAULTS


def prepare_args(dataset: str, root: str, out: str, protocol: str, holdout_fraction: float, trial_seed: int, shots: int,
                 seeds, templates: str = DEFAULTS["data_templates"], class_names: str = DEFAULTS["data_class_names"],
                 listing: str = DEFAULTS["data_listing"]) -> list[str]:
    cmd = ["prepare", dataset, root, out, "--protocol", protocol, "--holdout-fraction", str(holdout_fraction),
           "--trial-seed", str(int(trial_seed)), "--shots", str(int(shots)), "--templates", templates,
           "--class-names", class_names, "--listing", listing]
    for seed in seeds:
        cmd += ["--seed", str(int(seed))]
    return cmd


def similarity_args(prepared: str, out: str, model_name: str, pretrained: str) -> list[str]:
    return ["similarity", prepared, out, "--model", model_name, "--pretrained", pretrained]


def train_args(prepared: str, out: str, cell: dict, formulation: str, recipe: str, steps: int, epochs: int,
               batch_size: int, lr: float, hflip: bool, model_name: str, pretrained: str, similarity: str) -> list[str]:
    """Every training setting explicit (resolved before submission): the pipeline's parameters are what runs.
    The length is ``steps``, or ``epochs`` passes over the training set when steps is 0 (known only from the data)."""
    cmd = ["train", prepared, out, "--method", cell["method"]]
    if cell.get("seed") is not None:  # zero-shot: one cell per held-out domain, no seed
        cmd += ["--seed", str(int(cell["seed"]))]
    hparams = cell.get("hparams") or {}
    for key, value in sorted(hparams.items()):  # the selection grid's settings of this cell
        cmd += ["--hparam", f"{key}={json.dumps(value)}"]
    cmd += ["--formulation", formulation, "--model", model_name, "--pretrained", pretrained, "--no-progress",
            "--similarity", similarity, "--num-workers", "auto"]  # the pod's CPU limit sizes the workers
    from alignclip.config import is_zeroshot

    if is_zeroshot(cell["method"]):  # trains nothing: no training setting reaches it (nor its record)
        return cmd + (["--test-domain", cell["test_domain"]] if cell["test_domain"] else [])
    # a setting the cell's grid varies is given once, by its --hparam (which would win), not beside it as well
    cmd += ["--recipe", recipe]
    cmd += [] if "batch_size" in hparams else ["--batch-size", str(int(batch_size))]
    cmd += [] if "lr" in hparams else ["--lr", repr(float(lr))]
    cmd += ["--hflip" if hflip else "--no-hflip"]
    steps = cell.get("steps", steps)  # a recipe whose length depends on the held-out domain: the cell's own
    if "steps" not in hparams:  # (else its --hparam gives the length)
        if int(steps) > 0:
            cmd += ["--steps", str(int(steps))]
        elif int(epochs) > 0:
            cmd += ["--epochs", str(int(epochs))]
        else:
            raise ValueError(f"train_steps={steps} and train_epochs={epochs}: one of them must be positive")
    if cell["test_domain"]:
        cmd += ["--test-domain", cell["test_domain"]]
    return cmd


def evaluate_args(prepared: str, checkpoint: str, out: str, test_split: str) -> list[str]:
    """The held-out domain is the checkpoint's own (evaluate reads it from there)."""
    return ["evaluate", prepared, checkpoint, out, "--test-split", test_split, "--num-workers", "auto"]


def report_args(results: str, out: str, prepared: str, matrix: str) -> list[str]:
    return ["report", results, out, "--prepared-dir", prepared, "--similarity-dir", matrix]
