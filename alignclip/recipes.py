"""Named hyper-parameter recipes, each with its source: the paper's defaults (A.1) and the released scripts'.

Precedence (alignclip/config.py): method defaults < recipe < family defaults < params file < command line; a
value that is not set (None) leaves the recipe's. Epoch-based recipes turn into steps at training time: epochs x iterations per epoch
(500 for the DomainBed scripts; one pass over the few-shot set for base-to-new).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

RELEASE = "released AlignCLIP scripts (CLIPood fork)"


@dataclass(frozen=True)
class Recipe:
    source: str
    lr: float = 5e-6
    batch_size: int = 36
    steps: int | None = None
    epochs: int | None = None
    iters_per_epoch: int | None = None  # None: one pass over the training set per epoch
    method: dict = field(default_factory=dict)  # method switches: margin_alpha, bma_beta
    hflip: bool = True

    def describe(self) -> str:
        length = f"{self.steps} steps" if self.steps else f"{self.epochs} epochs x {self.iters_per_epoch or 'one pass'}"
        switches = " ".join(f"{k}={v}" for k, v in self.method.items())
        return f"lr={self.lr:g} batch={self.batch_size} {length} {switches} [{self.source}]"


def _domain_shift(lr=5e-6, epochs=10, alpha=0.3):
    return Recipe(RELEASE + ", domain shift", lr, 36, None, epochs, 500, {"margin_alpha": alpha, "bma_beta": 0.5})


def _base2new(epochs):
    return Recipe(RELEASE + ", base-to-new (16 shots)", 5e-6, 36, None, epochs, None, {"bma_beta": 0.1})


RECIPES: dict[str, Recipe] = {
    "paper": Recipe("paper appendix A.1", 5e-6, 36, 5000, method={"bma_beta": 0.5}),
    "demo": Recipe("ours: tiny preset on RotatedDigits, CPU minutes", 1e-4, 8, 30, method={"bma_beta": 0.5}, hflip=False),
    # domain shift (DomainBed leave-one-domain-out)
    "domain_shift/pacs": _domain_shift(),
    "domain_shift/vlcs": _domain_shift(),
    "domain_shift/terra_incognita": _domain_shift(),
    "domain_shift/office_home": _domain_shift(lr=1e-5),
    "domain_shift/domain_net": _domain_shift(lr=1e-5, epochs=20, alpha=0.1),
    # domain shift + unseen classes (CLIPood in the wild)
    "wild/office_home": Recipe(RELEASE + ", in the wild", 3e-6, 36, None, 10, 500, {"margin_alpha": 0.1, "bma_beta": 0.1}),
    "wild/domain_net": Recipe(RELEASE + ", in the wild", 5e-6, 36, None, 20, 500, {"margin_alpha": 0.1, "bma_beta": 0.5}),
    # base-to-new: epochs per dataset
    **{
        f"base2new/{name}": _base2new(epochs)
        for name, epochs in {
            "imagenet": 10, "caltech101": 1, "oxford_pets": 1, "stanford_cars": 5, "flowers102": 1, "food101": 1,
            "fgvc_aircraft": 10, "sun397": 5, "dtd": 1, "eurosat": 1, "ucf101": 2,
        }.items()
    },
    # ImageNet -> variants: the ImageNet-trained BMA model is evaluated on the variants, no training on them
    "imagenet": Recipe(RELEASE + ", ImageNet 16-shot", 5e-6, 36, None, 10, None, {"bma_beta": 0.5}),
}


# Without a recipe: TrainSettings' defaults (alignclip/train.py; tests/test_config.py keeps the two equal). Written
# out here so that resolving settings (pipeline commands, --dry-run) does not import torch.
NO_RECIPE = Recipe("library defaults", 5e-6, 36, 5000)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: expected one of {', '.join(RECIPES)}")
    return RECIPES[name]


def effective_schedule(name: str | None, steps=None, epochs=None, batch_size=None, lr=None, hflip=None) -> dict:
    """The effective training settings: the recipe's values (the library's defaults without one), then the ones set.

    ``None`` is "not set" (never 0). The length is ``steps`` whenever it is known before the data is (steps, or
    epochs x iterations per epoch); else ``epochs`` passes over the training set. An explicit ``steps`` beats the
    recipe's epochs and an explicit ``epochs`` its steps."""
    base = NO_RECIPE
    effective = {"recipe": name, "lr": base.lr, "batch_size": base.batch_size, "steps": base.steps, "epochs": base.epochs,
                 "iters_per_epoch": base.iters_per_epoch, "hflip": base.hflip, "method_switches": {}}
    if name:
        recipe = get_recipe(name)
        effective.update(lr=recipe.lr, batch_size=recipe.batch_size, steps=recipe.steps, epochs=recipe.epochs,
                         iters_per_epoch=recipe.iters_per_epoch, hflip=recipe.hflip, method_switches=dict(recipe.method))
    if steps is not None:
        effective.update(steps=steps, epochs=None, iters_per_epoch=None)
    elif epochs is not None:
        effective.update(steps=None, epochs=epochs)
    if not effective["steps"] and effective["epochs"] and effective["iters_per_epoch"]:
        effective["steps"] = effective["epochs"] * effective["iters_per_epoch"]
    if effective["steps"]:
        effective.update(epochs=None, iters_per_epoch=None)
    for key, value in (("batch_size", batch_size), ("lr", lr), ("hflip", hflip)):
        if value is not None:
            effective[key] = value
    return effective


def apply_recipe(settings, name: str | None, steps=None, batch_size=None, lr=None, epochs=None, hflip=None):
    """TrainSettings with the recipe's values, then the explicit ones (which win); the recipe's method switches
    sit under the switches already set (``--set``)."""
    effective = effective_schedule(name, steps, epochs, batch_size, lr, hflip)
    return replace(
        settings,
        lr=effective["lr"],
        batch_size=effective["batch_size"],
        steps=effective["steps"],
        epochs=effective["epochs"],
        iters_per_epoch=effective["iters_per_epoch"],
        hflip=effective["hflip"],
        overrides={**effective["method_switches"], **settings.overrides},
        recipe=name,
    )
