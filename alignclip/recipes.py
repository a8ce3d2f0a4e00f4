"""Named hyper-parameter recipes, each with its source: the paper's defaults (A.1) and the released scripts'.

Precedence (alignclip/config.py): method defaults < recipe < family defaults < params file < command line; a
value that is not set (None) leaves the recipe's. Epoch-based recipes turn into steps: epochs x iterations per
epoch (500 in every released script: both code bases' main.py default ``-i 500``, which no script overrides), with
the held-out domain's own epochs where the scripts differ per target (``epochs_by_domain``).
Every released recipe cites the script and line each of its values comes from (docs/fidelity.md, Recipes).
"""

from __future__ import annotations

from dataclasses import dataclass

RELEASE = "zhyhan/AlignCLIP"  # the authors' released code (a CLIPood fork): scripts/*.sh over main.py's defaults
CLIPOOD = "thuml/CLIPood"  # CLIPood's scripts.sh
# main.py's argparse defaults that a released script does not override (zhyhan/AlignCLIP main.py, line):
# --n-shot 0 (118: no few-shot sampling), -b 36 (124), --lr 5e-6 (127), --wd 0.1 (129), --epochs 10 (133),
# -i 500 iterations per epoch (135), --alpha 0.3 (146), --beta 0.5 (147).
RELEASE_DEFAULTS = "main.py:118,124,127,133,135,146,147 defaults"


@dataclass(frozen=True)
class Recipe:
    """A named set of training values, each from its source: a layer of the settings' precedence
    (alignclip/config.py: method < recipe < family < params file < explicit). Every field is stated by the recipe
    (from PAPER_A1 or RELEASE_MAIN below), none defaults here."""

    source: str  # the script and line(s) each value comes from
    lr: float
    batch_size: int
    steps: int | None  # None: epochs x iters_per_epoch
    epochs: int | None
    iters_per_epoch: int | None  # None: one pass over the training set per epoch
    method: dict  # method switches: margin_alpha, bma_beta
    hflip: bool
    shots: int | None  # few-shot protocols: images per class trained on (the prepared subset); 0: all
    epochs_by_domain: dict  # held-out domain -> epochs, where scripts differ per target

    def describe(self) -> str:
        length = f"{self.steps} steps" if self.steps else f"{self.epochs} epochs x {self.iters_per_epoch or 'one pass'}"
        if self.epochs_by_domain:
            length += " (" + ", ".join(f"{d}: {e} epochs" for d, e in self.epochs_by_domain.items()) + ")"
        if self.shots is not None:
            length += f", {self.shots or 'all'} shots"
        switches = " ".join(f"{k}={v}" for k, v in self.method.items())
        return f"lr={self.lr:g} batch={self.batch_size} {length} {switches} [{self.source}]"

    def epochs_for(self, test_domain: str | None) -> int | None:
        return self.epochs_by_domain.get(test_domain, self.epochs) if test_domain else self.epochs

    def layer(self, test_domain: str | None = None) -> dict:
        """The recipe as a settings layer by pipeline name (``config.fold``); ``test_domain``: the held-out domain,
        for recipes whose epochs differ per target. ``train_iters_per_epoch`` and ``train_shots`` are set by
        recipes only (the length's unit and the few-shot protocols' training subset)."""
        return {"train_lr": self.lr, "train_batch_size": self.batch_size, "train_steps": self.steps,
                "train_epochs": self.epochs_for(test_domain), "train_iters_per_epoch": self.iters_per_epoch,
                "train_hflip": self.hflip, "train_shots": self.shots, "method_switches": dict(self.method)}


# The paper's appendix A.1: lr 5e-6, 36 images per domain, 5000 steps, BMA beta 0.5
PAPER_A1 = dict(lr=5e-6, batch_size=36, steps=5000, epochs=None, iters_per_epoch=None, method={"bma_beta": 0.5},
                hflip=True, shots=None, epochs_by_domain={})
# zhyhan/AlignCLIP main.py's argparse defaults (RELEASE_DEFAULTS): what a released script runs where it passes no flag
RELEASE_MAIN = dict(lr=5e-6, batch_size=36, steps=None, epochs=10, iters_per_epoch=500,
                    method={"margin_alpha": 0.3, "bma_beta": 0.5}, hflip=True, shots=None, epochs_by_domain={})


def _recipe(source: str, base: dict, **values) -> Recipe:
    return Recipe(source, **{**base, **values})


def _domain_shift(script: str, **values):
    return _recipe(f"{RELEASE} {script}; {RELEASE_DEFAULTS}", RELEASE_MAIN, **values)


# Base-to-new, the authors' form: scripts/trainopenclass.sh passes --epochs and --beta 0.1 only (line of --epochs
# of each dataset's first run below), so main.py's defaults give all base-class training images (--n-shot 0),
# 500 iterations per epoch and lr 5e-6.
BASE2NEW_EPOCHS = {  # dataset: (epochs, trainopenclass.sh line)
    "imagenet": (10, 269), "caltech101": (1, 18), "oxford_pets": (1, 43), "stanford_cars": (5, 68),
    "flowers102": (1, 93), "food101": (1, 118), "fgvc_aircraft": (10, 143), "sun397": (5, 168), "dtd": (1, 193),
    "eurosat": (1, 218), "ucf101": (2, 244),
}
# CLIPood's form: scripts.sh lines 30-40 pass --n-shot 16 -b 36 --lr 5e-6 --epochs E --lam 0.3 --beta 0.1; its
# main.py defaults to -i 500 (line 129).
CLIPOOD_BASE2NEW_LINES = {
    "imagenet": 30, "caltech101": 31, "oxford_pets": 32, "stanford_cars": 33, "flowers102": 34, "food101": 35,
    "fgvc_aircraft": 36, "sun397": 37, "dtd": 38, "eurosat": 39, "ucf101": 40,
}


def _base2new(name: str) -> Recipe:
    epochs, line = BASE2NEW_EPOCHS[name]
    source = f"{RELEASE} scripts/trainopenclass.sh:{line} (--epochs), --beta 0.1; {RELEASE_DEFAULTS}"
    return _recipe(source, RELEASE_MAIN, epochs=epochs, method={**RELEASE_MAIN["method"], "bma_beta": 0.1}, shots=0)


def _base2new_clipood(name: str) -> Recipe:
    epochs, _ = BASE2NEW_EPOCHS[name]  # the same epochs in both script sets
    source = f"{CLIPOOD} scripts.sh:{CLIPOOD_BASE2NEW_LINES[name]}; main.py:129 (-i 500)"
    # -b 36 --lr 5e-6 --lam 0.3 as main.py's; main.py:129 -i 500
    return _recipe(source, RELEASE_MAIN, epochs=epochs, method={"margin_alpha": 0.3, "bma_beta": 0.1}, shots=16)


RECIPES: dict[str, Recipe] = {
    "paper": _recipe("paper appendix A.1", PAPER_A1),
    # the demo's (params.yaml leaves these to it; its selection grid varies lr): 8x8 digits, no flip (a flipped 2 is no 2)
    "demo": _recipe("ours: tiny preset on RotatedDigits, CPU minutes", PAPER_A1, lr=1e-3, batch_size=8, steps=40, hflip=False),
    # domain shift (DomainBed leave-one-domain-out)
    "domain_shift/pacs": _domain_shift("scripts/trainpacs.sh:14-97"),
    "domain_shift/vlcs": _domain_shift("scripts/trainvlcs.sh:14-97"),
    "domain_shift/terra_incognita": _domain_shift("scripts/trainTerraIncognita.sh:14-97"),
    "domain_shift/office_home": _domain_shift("scripts/trainhome.sh:17 (--lr 1e-5)", lr=1e-5),
    "domain_shift/domain_net": _domain_shift(
        "scripts/traindomainnet-1.sh:17,21,22 and -2.sh:18,22,23 (--lr 1e-5 --epochs 20 --alpha 0.1)", lr=1e-5, epochs=20,
        method={**RELEASE_MAIN["method"], "margin_alpha": 0.1},
    ),
    # domain shift + unseen classes (CLIPood in the wild)
    "wild/office_home": _recipe(
        f"{RELEASE} scripts/trainhome-wilds.sh:21-24 (--epochs 10 --lr 3e-6 --alpha 0.1 --beta 0.1); main.py:135 (-i 500)",
        RELEASE_MAIN, lr=3e-6, epochs=10, method={"margin_alpha": 0.1, "bma_beta": 0.1},
    ),
    # targets 0-2 (clipart, infograph, painting: DomainBed's sorted folders) 20 epochs, targets 3-5 10 epochs;
    # no --alpha, --lr or --beta: main.py's 0.3, 5e-6, 0.5
    "wild/domain_net": _recipe(
        f"{RELEASE} scripts/traindomainnet-wilds-1.sh:21,30,39 (targets 0-2: --epochs 20), "
        f"traindomainnet-wilds-2.sh:21,30,39 (targets 3-5: --epochs 10); {RELEASE_DEFAULTS}",
        RELEASE_MAIN, epochs=20, epochs_by_domain={"quickdraw": 10, "real": 10, "sketch": 10},
    ),
    "wild-clipood/domain_net": _recipe(
        f"{CLIPOOD} scripts.sh:48-53 (-b 12 --lr 5e-6 --epochs 20 --lam 0.1 --beta 0.5); main.py:129 (-i 500)",
        RELEASE_MAIN, batch_size=12, epochs=20, method={"margin_alpha": 0.1, "bma_beta": 0.5},
    ),
    # base-to-new, both released forms
    **{f"base2new/{name}": _base2new(name) for name in BASE2NEW_EPOCHS},
    **{f"base2new-clipood/{name}": _base2new_clipood(name) for name in BASE2NEW_EPOCHS},
    # ImageNet -> variants: the ImageNet-trained BMA model is evaluated on the variants, no training on them.
    # 16 shots: paper A.2.1 (CoCoOp's protocol). The released ImageNet run (scripts/trainimagenet.sh:15-21) is
    # commented out and passes no --n-shot/--epochs/--beta: main.py's 10 epochs x 500 iterations, beta 0.5.
    "imagenet": _recipe(
        f"paper A.2.1 (16 shots); {RELEASE} scripts/trainimagenet.sh:15-21 with {RELEASE_DEFAULTS}",
        RELEASE_MAIN, method={"bma_beta": 0.5}, shots=16,
    ),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: expected one of {', '.join(RECIPES)}")
    return RECIPES[name]
