import copy
import math

import pytest
import torch
from scipy import stats

from alignclip.bma import BetaMovingAverage


def test_weights_are_the_beta_pdf():
    model = torch.nn.Linear(2, 2)
    bma = BetaMovingAverage(model, total_steps=9, beta=0.5)
    for k in range(10):
        assert bma.weight(k) == pytest.approx(stats.beta(0.5, 0.5).pdf((k + 0.5) / 10))


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
def test_average_equals_weighted_mean_of_iterates(beta):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    total = 7
    bma = BetaMovingAverage(model, total, beta)
    snapshots = [{k: v.clone() for k, v in model.state_dict().items()}]
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].num_batches_tracked += 1
        bma.update(model)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    weights = [stats.beta(beta, beta).pdf((k + 0.5) / (total + 1)) for k in range(len(snapshots))]
    for name, value in bma.module.state_dict().items():
        if value.is_floating_point():
            expected = sum(w * s[name] for w, s in zip(weights, snapshots)) / sum(weights)
            assert torch.allclose(value, expected, atol=1e-6), name
        else:
            assert torch.equal(value, snapshots[-1][name])
    assert bma.total_weight == pytest.approx(sum(weights))


def test_state_dict_round_trip():
    model = torch.nn.Linear(2, 3)
    bma = BetaMovingAverage(model, 4)
    with torch.no_grad():
        model.weight.add_(1.0)
    bma.update(model)
    other = BetaMovingAverage(torch.nn.Linear(2, 3), 99, beta=0.9)
    other.load_state_dict(bma.state_dict())
    assert other.step == 1 and other.total_steps == 4 and other.beta == 0.5
    assert math.isclose(other.total_weight, bma.total_weight)
    for a, b in zip(bma.module.state_dict().values(), other.module.state_dict().values()):
        assert torch.equal(a, b)
    # the averaged copy is independent of the live model and takes no gradient
    assert all(not p.requires_grad for p in bma.module.parameters())


def state_dict_loop_update(module: torch.nn.Module, model: torch.nn.Module, ratio: float) -> None:
    """The previous update, written out: one lerp/copy per state_dict entry."""
    current = model.state_dict()
    for name, avg in module.state_dict().items():
        if avg.is_floating_point():
            avg.lerp_(current[name].to(avg.dtype), ratio)
        else:
            avg.copy_(current[name])


def test_fused_update_equals_the_per_tensor_loop(tiny):
    from alignclip.methods import get_method
    from alignclip.classifier import make_visual

    torch.manual_seed(1)
    visual = make_visual(copy.deepcopy(tiny), get_method("alignclip"))  # the session's tiny CLIP stays untouched
    bma = BetaMovingAverage(visual, total_steps=6, beta=0.5)
    reference = copy.deepcopy(bma.module)
    total = bma.total_weight
    for step in range(1, 4):
        with torch.no_grad():
            for p in visual.parameters():
                p.add_(torch.randn_like(p), alpha=0.1)
        w = bma.update(visual)
        state_dict_loop_update(reference, visual, w / (total + w))
        total += w
    for (name, a), b in zip(bma.module.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), name
    assert not torch.equal(bma.module.state_dict()["visual.proj"], visual.state_dict()["visual.proj"])
