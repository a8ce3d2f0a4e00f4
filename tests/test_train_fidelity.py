"""Training switches against the released code's behaviour, written out here: weight decay on every parameter
(zhyhan/AlignCLIP main.py:65 ``AdamW(classifier.parameters(), lr=args.lr, weight_decay=args.wd)``) or on weight
matrices only (ours), and the base-to-new training set of each released recipe (all base images or 16 shots)."""

import copy

import pytest
import torch

from alignclip.data.prepare import PrepareSettings, prepare, write_prepared
from alignclip.methods import get_method
from alignclip.model import AlignCLIPVisual
from alignclip.train import TrainSettings, apply_recipe, make_optimizer, setup
from tests.test_prepare import coop_tree

LR, WD = 1e-2, 0.1


def one_step(tiny, scope, grads):
    bundle = copy.deepcopy(tiny)
    visual = AlignCLIPVisual(bundle.model.visual)
    before = {n: p.detach().clone() for n, p in visual.named_parameters()}
    optimizer = make_optimizer(bundle, visual, LR, WD, scope)
    for name, p in visual.named_parameters():
        p.grad = grads[name].clone()
    optimizer.step()
    return before, {n: p.detach() for n, p in visual.named_parameters()}


def zero_grads(tiny):
    return {n: torch.zeros_like(p) for n, p in AlignCLIPVisual(tiny.model.visual).named_parameters()}


def test_weight_decay_scope_all_decays_every_parameter(tiny):
    # zero gradients: only decoupled weight decay moves a parameter, p <- p * (1 - lr * wd)
    before, after = one_step(tiny, "all", zero_grads(tiny))
    for name, p in after.items():
        assert torch.allclose(p, before[name] * (1 - LR * WD), atol=1e-7), name


def test_weight_decay_scope_all_is_the_released_optimiser(tiny):
    torch.manual_seed(0)
    grads = {n: torch.randn_like(g) for n, g in zero_grads(tiny).items()}
    _, ours = one_step(tiny, "all", grads)
    reference = copy.deepcopy(tiny.model.visual)  # main.py:65: AdamW(classifier.parameters(), lr, weight_decay=wd)
    released = torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=WD)
    for name, p in reference.named_parameters():
        p.grad = grads["visual." + name].clone()
    released.step()
    for name, p in reference.named_parameters():
        assert torch.allclose(ours["visual." + name], p.detach(), atol=1e-7), name


def test_weight_decay_scope_matrices_exempts_biases_norms_and_embeddings(tiny):
    before, after = one_step(tiny, "matrices", zero_grads(tiny))
    decayed = {n for n, p in after.items() if not torch.equal(p, before[n])}
    # written out: weight matrices (2-D and up) decay; biases, LayerNorm gains, class/positional embeddings do not
    expected = {n for n, p in before.items() if p.ndim >= 2 and "embedding" not in n}
    assert decayed == expected
    assert "visual.conv1.weight" in decayed and "visual.proj" in decayed
    assert not decayed & {"visual.class_embedding", "visual.positional_embedding", "visual.ln_post.weight"}
    for name in decayed:
        assert torch.allclose(after[name], before[name] * (1 - LR * WD), atol=1e-7)


def test_weight_decay_scope_by_formulation():
    assert get_method("alignclip").weight_decay_scope == "matrices"
    assert get_method("alignclip", "release").weight_decay_scope == "all"
    assert get_method("clipood", weight_decay_scope="all").weight_decay_scope == "all"
    with pytest.raises(ValueError, match="weight_decay_scope='some'"):
        get_method("alignclip", weight_decay_scope="some")


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    root, split = coop_tree(tmp_path_factory.mktemp("pets") / "oxford_pets", n_classes=5, per_split=(20, 3, 2))
    out = tmp_path_factory.mktemp("prepared")
    manifest, meta = prepare(PrepareSettings("oxford_pets", str(root), shots=16, seeds=[0]))
    write_prepared(manifest, meta, out)
    return out


def test_authors_base2new_trains_every_base_image_for_500_iterations_per_epoch(pets):
    settings = apply_recipe(TrainSettings(method="erm", progress=False), "base2new/oxford_pets")
    run = setup(pets, settings)
    assert run.summary["train_images"] == 3 * 20  # base classes 0-2 (ceil(5 / 2)), every training image
    assert run.steps == 1 * 500  # trainopenclass.sh:43 --epochs 1; main.py:135 -i 500
    assert run.summary["settings"]["shots"] == 0


def test_clipood_base2new_trains_the_16_shot_subset(pets):
    settings = apply_recipe(TrainSettings(method="erm", progress=False), "base2new-clipood/oxford_pets")
    run = setup(pets, settings)
    assert run.summary["train_images"] == 3 * 16
    assert run.steps == 500 and run.summary["settings"]["shots"] == 16


def test_recipe_shots_must_match_the_preparation(tmp_path):
    root, _ = coop_tree(tmp_path / "oxford_pets", n_classes=3, per_split=(6, 2, 2))
    manifest, meta = prepare(PrepareSettings("oxford_pets", str(root), shots=4, seeds=[0]))
    write_prepared(manifest, meta, tmp_path / "prepared")
    settings = apply_recipe(TrainSettings(method="erm", progress=False), "base2new-clipood/oxford_pets")
    with pytest.raises(ValueError, match="shots=16: the data was prepared with 4 shots"):
        setup(tmp_path / "prepared", settings)
