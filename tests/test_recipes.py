"""Every released recipe against the values its source script gives, written out here from the scripts.

zhyhan/AlignCLIP (the authors' release): a script passes a few flags; the rest are main.py's argparse defaults:
  main.py:118 --n-shot 0 | :124 -b 36 | :127 --lr 5e-6 | :133 --epochs 10 | :135 -i 500 | :146 --alpha 0.3 |
  :147 --beta 0.5
thuml/CLIPood: scripts.sh passes -b, --lr, --epochs, --lam, --beta (and --n-shot for open class); main.py:129 -i 500.
"""

import re

import pytest

from alignclip.recipes import RECIPES, get_recipe
from alignclip.train import TrainSettings, apply_recipe, total_steps

# zhyhan/AlignCLIP scripts/trainopenclass.sh: (--epochs, line of --epochs in the dataset's first run); every
# run passes --beta 0.1 and no --n-shot, -i, --lr, --alpha
AUTHORS_BASE2NEW = {
    "caltech101": (1, 18), "oxford_pets": (1, 43), "stanford_cars": (5, 68), "flowers102": (1, 93),
    "food101": (1, 118), "fgvc_aircraft": (10, 143), "sun397": (5, 168), "dtd": (1, 193), "eurosat": (1, 218),
    "ucf101": (2, 244), "imagenet": (10, 269),
}
# thuml/CLIPood scripts.sh:30-40: --n-shot 16 -b 36 --lr 5e-6 --epochs E --lam 0.3 --beta 0.1
CLIPOOD_BASE2NEW = {
    "imagenet": (10, 30), "caltech101": (1, 31), "oxford_pets": (1, 32), "stanford_cars": (5, 33),
    "flowers102": (1, 34), "food101": (1, 35), "fgvc_aircraft": (10, 36), "sun397": (5, 37), "dtd": (1, 38),
    "eurosat": (1, 39), "ucf101": (2, 40),
}


@pytest.mark.parametrize("dataset", sorted(AUTHORS_BASE2NEW))
def test_base2new_is_the_authors_trainopenclass_script(dataset):
    epochs, line = AUTHORS_BASE2NEW[dataset]
    recipe = get_recipe(f"base2new/{dataset}")
    assert recipe.epochs == epochs
    assert recipe.iters_per_epoch == 500  # main.py:135 default, no -i in the script
    assert recipe.shots == 0  # main.py:118 --n-shot 0: every base-class training image
    assert recipe.lr == 5e-6 and recipe.batch_size == 36  # main.py:127, :124
    assert recipe.method == {"margin_alpha": 0.3, "bma_beta": 0.1}  # main.py:146 default; --beta 0.1
    assert f"trainopenclass.sh:{line}" in recipe.source


@pytest.mark.parametrize("dataset", sorted(CLIPOOD_BASE2NEW))
def test_base2new_clipood_is_clipoods_script(dataset):
    epochs, line = CLIPOOD_BASE2NEW[dataset]
    recipe = get_recipe(f"base2new-clipood/{dataset}")
    assert (recipe.epochs, recipe.iters_per_epoch, recipe.shots) == (epochs, 500, 16)
    assert (recipe.lr, recipe.batch_size) == (5e-6, 36)
    assert recipe.method == {"margin_alpha": 0.3, "bma_beta": 0.1}
    assert f"scripts.sh:{line}" in recipe.source


def test_oxford_pets_trains_500_iterations_not_one_pass():
    # the case: 16 shots x 37 base-half classes (19) in batches of 36 used to give 9 steps in all
    settings = apply_recipe(TrainSettings(), "base2new/oxford_pets")
    assert total_steps(settings, train_images=19 * 100, domains=1) == 1 * 500
    assert settings.shots == 0
    clipood = apply_recipe(TrainSettings(), "base2new-clipood/oxford_pets")
    assert total_steps(clipood, train_images=19 * 16, domains=1) == 500 and clipood.shots == 16


@pytest.mark.parametrize(
    "domain, epochs",
    # traindomainnet-wilds-1.sh:18/21, 27/30, 36/39: targets 0, 1, 2 with --epochs 20;
    # traindomainnet-wilds-2.sh:18/21, 27/30, 36/39: targets 3, 4, 5 with --epochs 10 (DomainBed's sorted folders)
    [("clipart", 20), ("infograph", 20), ("painting", 20), ("quickdraw", 10), ("real", 10), ("sketch", 10)],
)
def test_wild_domain_net_follows_the_authors_per_target_epochs(domain, epochs):
    settings = apply_recipe(TrainSettings(test_domain=domain), "wild/domain_net")
    assert settings.steps == epochs * 500  # known before the data: epochs x main.py's 500 iterations
    assert total_steps(settings, train_images=10**6, domains=5) == epochs * 500
    # no --alpha, --lr, --beta in those scripts: main.py:146, :127, :147
    assert settings.overrides == {"margin_alpha": 0.3, "bma_beta": 0.5}
    assert settings.lr == 5e-6 and settings.batch_size == 36


def test_wild_clipood_domain_net_keeps_clipoods_values():
    # thuml/CLIPood scripts.sh:48-53: -b 12 --lr 5e-6 --epochs 20 --lam 0.1 --beta 0.5
    recipe = get_recipe("wild-clipood/domain_net")
    assert (recipe.batch_size, recipe.lr, recipe.epochs, recipe.iters_per_epoch) == (12, 5e-6, 20, 500)
    assert recipe.method == {"margin_alpha": 0.1, "bma_beta": 0.5}


@pytest.mark.parametrize(
    "name, lr, epochs, alpha",
    [
        ("domain_shift/pacs", 5e-6, 10, 0.3),  # trainpacs.sh: only --data/--seed/--targets
        ("domain_shift/vlcs", 5e-6, 10, 0.3),  # trainvlcs.sh: the same
        ("domain_shift/terra_incognita", 5e-6, 10, 0.3),  # trainTerraIncognita.sh: the same
        ("domain_shift/office_home", 1e-5, 10, 0.3),  # trainhome.sh:17 --lr 1e-5
        ("domain_shift/domain_net", 1e-5, 20, 0.1),  # traindomainnet-1.sh:17,21,22 --lr 1e-5 --epochs 20 --alpha 0.1
    ],
)
def test_domain_shift_recipes(name, lr, epochs, alpha):
    recipe = get_recipe(name)
    assert (recipe.lr, recipe.epochs, recipe.iters_per_epoch, recipe.batch_size) == (lr, epochs, 500, 36)
    assert recipe.method == {"margin_alpha": alpha, "bma_beta": 0.5}


def test_wild_office_home():
    # trainhome-wilds.sh:21-24: --epochs 10 --lr 3e-6 --alpha 0.1 --beta 0.1
    recipe = get_recipe("wild/office_home")
    assert (recipe.lr, recipe.epochs, recipe.iters_per_epoch) == (3e-6, 10, 500)
    assert recipe.method == {"margin_alpha": 0.1, "bma_beta": 0.1}


def test_every_released_recipe_cites_a_script_line():
    for name, recipe in RECIPES.items():
        if name in ("paper", "demo"):
            continue
        assert re.search(r"\.sh:\d+", recipe.source), (name, recipe.source)


def test_explicit_values_beat_the_recipe():
    settings = apply_recipe(TrainSettings(test_domain="sketch"), "wild/domain_net", steps=7, lr=1e-3)
    assert (settings.steps, settings.epochs, settings.lr) == (7, None, 1e-3)


def test_imagenet_recipe():
    # 16 shots: paper A.2.1; trainimagenet.sh:15-21 passes no --epochs/--beta: main.py:133 10, :135 500, :147 0.5
    recipe = get_recipe("imagenet")
    assert (recipe.shots, recipe.epochs, recipe.iters_per_epoch, recipe.lr, recipe.batch_size) == (16, 10, 500, 5e-6, 36)
    assert recipe.method == {"bma_beta": 0.5}
