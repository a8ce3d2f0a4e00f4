"""Each loss function against a straightforward implementation written out independently (loops, no shared
helpers). The assembled loss that training runs is checked against the paper's equations in test_objective.py."""

import math

import pytest
import torch

from alignclip import losses
from alignclip.similarity import class_similarity_matrix

torch.manual_seed(0)


def naive_softmax(values):
    exps = [math.exp(v) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def test_class_similarity_matrix_matches_loops():
    text = torch.randn(5, 7, dtype=torch.float64)
    got = class_similarity_matrix(text)
    for i in range(5):
        cos = []
        for j in range(5):
            a, b = text[i].tolist(), text[j].tolist()
            dot = sum(x * y for x, y in zip(a, b))
            cos.append(dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))))
        expected = naive_softmax(cos)
        assert got[i].tolist() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(got.sum(dim=1), torch.ones(5, dtype=got.dtype))


def test_scaled_similarity_is_sharper():
    text = torch.randn(6, 8)
    assert class_similarity_matrix(text, 35.0).diagonal().mean() > class_similarity_matrix(text).diagonal().mean()


def naive_sls(logits, targets, sim, eps):
    total = 0.0
    for b in range(logits.shape[0]):
        logp = [math.log(p) for p in naive_softmax(logits[b].tolist())]
        y = int(targets[b])
        ce = -logp[y]
        semantic = -sum(sim[y, j].item() * logp[j] for j in range(len(logp)))
        total += (1 - eps) * ce + eps * semantic
    return total / logits.shape[0]


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4, 1.0])
def test_semantic_label_smoothing_matches_formula(eps):
    logits = torch.randn(6, 5, dtype=torch.float64) * 3
    targets = torch.tensor([0, 1, 4, 2, 2, 3])
    sim = class_similarity_matrix(torch.randn(5, 9, dtype=torch.float64))
    got = losses.semantic_label_smoothing_loss(logits, targets, sim, eps)
    assert got.item() == pytest.approx(naive_sls(logits, targets, sim, eps), rel=1e-6)


def test_sls_with_identity_similarity_is_cross_entropy():
    logits = torch.randn(4, 3)
    targets = torch.tensor([0, 2, 1, 1])
    got = losses.semantic_label_smoothing_loss(logits, targets, torch.eye(3), 0.3)
    assert got.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-5)


def naive_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def test_kl_divergence_matches_the_sum_and_is_safe_for_zeros():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    q = torch.tensor([[0.25] * 4, [0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    got = losses.kl_divergence(p, q)
    assert got.tolist() == pytest.approx([naive_kl(p[b].tolist(), q[b].tolist()) for b in range(2)], rel=1e-6)
    assert got[0].item() == pytest.approx(math.log(2))  # 2 x 0.5 log(0.5 / 0.25)
    a = torch.tensor([[0.5, 0.5, 0.0, 0.0]], requires_grad=True)
    losses.kl_divergence(a, torch.full((1, 4), 0.25)).sum().backward()
    assert torch.isfinite(a.grad).all()  # 0 log 0 has a finite gradient
    # zeros in the target are floored, not inf
    assert torch.isfinite(losses.kl_divergence(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])))


def test_token_text_similarity_matches_eq4():
    tokens = torch.randn(2, 6, 4, dtype=torch.float64)
    text = torch.randn(2, 4, dtype=torch.float64)
    got = losses.token_text_similarity(tokens, text, tau=0.5)
    for b in range(2):
        t = text[b] / text[b].norm()
        cos = [(tokens[b, m] / tokens[b, m].norm() @ t).item() / 0.5 for m in range(6)]
        assert got[b].tolist() == pytest.approx(naive_softmax(cos), rel=1e-6)


def test_margin_logits_match_clipood():
    image = torch.randn(3, 8, dtype=torch.float64)
    text = torch.randn(4, 8, dtype=torch.float64)
    targets = torch.tensor([1, 0, 3])
    got = losses.margin_logits(image, text, targets, alpha=0.3, tau=0.01)
    norm = lambda v: v / v.norm()  # noqa: E731
    for b in range(3):
        for c in range(4):
            # CLIPood: S(I, T_c) + alpha (1 - S(T_y, T_c)), shifted by the constant alpha (softmax-invariant)
            expected = (norm(image[b]) @ norm(text[c]) + 0.3 * (1 - norm(text[targets[b]]) @ norm(text[c])) - 0.3) / 0.01
            assert got[b, c].item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-9)


def test_release_sls_matches_released_code():
    logits = torch.randn(5, 4, dtype=torch.float64)
    targets = torch.tensor([0, 3, 1, 1, 2])
    text = torch.randn(4, 6, dtype=torch.float64)
    s35 = class_similarity_matrix(text, 35.0)
    got = losses.release_sls_loss(logits, targets, s35, on=0.9)
    total = 0.0
    for b in range(5):
        logp = [math.log(p) for p in naive_softmax(logits[b].tolist())]
        y = int(targets[b])
        target = [0.9 if j == y else s35[y, j].item() for j in range(4)]
        total += -sum(t * lp for t, lp in zip(target, logp))
    assert got.item() == pytest.approx(total / 5, rel=1e-6)


def test_kl_batchmean_matches_torch_kl_div():
    target = torch.rand(3, 2, 7).softmax(-1)
    pred = torch.rand(3, 2, 7).softmax(-1)
    expected = torch.nn.functional.kl_div(pred.log(), target, reduction="batchmean")
    assert losses.kl_batchmean(target, pred).item() == pytest.approx(expected.item(), rel=1e-5)
