"""The loss that training runs, checked against the paper's equations written out independently.

Every test calls ``objective.compute_loss`` with a real ``MethodConfig`` (from the method registry) and a real
``AlignCLIPVisual`` on the tiny CLIP, exactly as ``train.train_step`` does, and recomputes each term from the
model's outputs with plain Python loops (no shared helpers):

    logits   eq. 1   cos(I, T_c) / tau
    G, G_DV  eq. 4   softmax_m(cos(token_m, T_y) / tau)       (main and D-V branch)
    tau              1 / exp(logit_scale) of the loaded CLIP (its pre-trained setting, A.1), read here from the
                     model's parameter, not from the method
    L_AAL    eq. 6   mean_b sum_m [A log(A / G_DV) + G log(G / G_DV)]
    L_SLS    eq. 8-9 mean_b (1 - eps) CE + eps * (-sum_j S[y, j] log p_j)
    L        sec 3   aal_weight * L_AAL + lambda * L_SLS
"""

import math

import pytest
import torch
import torch.nn.functional as F

from alignclip.classifier import make_visual
from alignclip.methods import get_method
from alignclip.objective import compute_loss
from alignclip.similarity import class_similarity_matrix

TARGETS = [0, 3, 1, 3]
CLASSES = 5


def model_tau(bundle):
    """The CLIP's pre-trained temperature, from its own parameter: 1 / exp(logit_scale)."""
    return 1.0 / math.exp(float(bundle.model.logit_scale.detach()))


def resolved(bundle, name, formulation="paper", **switches):
    """The registry's method as training runs it: `model` temperatures replaced by the loaded CLIP's (train.setup)."""
    return get_method(name, formulation, **switches).for_model(bundle.tau)


def rows(t):
    return t.detach().double().tolist()


def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


@pytest.fixture()
def batch(tiny):
    torch.manual_seed(1)
    images = torch.randn(len(TARGETS), 3, tiny.image_size, tiny.image_size)
    text = F.normalize(torch.randn(CLASSES, tiny.model.text_projection.shape[1]), dim=-1)
    return images, torch.tensor(TARGETS), text


def paper_terms(method, out, text, class_sim, tau, aal_tau):
    """(L_SLS, AL, AS) of the paper's formulation from the model's outputs, by hand; ``tau`` of eq. 1 and
    ``aal_tau`` of eq. 4 are given by the test, not read from the method."""
    T = rows(text)
    sls = al = as_ = 0.0
    for b, y in enumerate(TARGETS):
        logits = [cos(rows(out.embedding)[b], T[c]) / tau for c in range(CLASSES)]
        logp = [math.log(p) for p in softmax(logits)]
        S = rows(class_sim)[y]
        sls += (1 - method.eps) * -logp[y] + method.eps * -sum(S[j] * logp[j] for j in range(CLASSES))
        tokens, dv_tokens = rows(out.tokens[b]), rows(out.dv_tokens[b])
        g = softmax([cos(t, T[y]) / aal_tau for t in tokens])
        g_dv = softmax([cos(t, T[y]) / aal_tau for t in dv_tokens])
        al += kl(rows(out.cls_attn[b]), g_dv)
        as_ += kl(g, g_dv)
    n = len(TARGETS)
    return sls / n, al / n, as_ / n


@pytest.mark.parametrize("switches", [{}, {"eps": 0.3, "aal_weight": 2.5, "sls_weight": 0.7}, {"tau": 0.01}, {"aal_tau": 0.05}])
def test_alignclip_loss_is_the_papers_equations(tiny, batch, switches):
    """Default: eq. 1 and eq. 4 at the model's own temperature (about 0.073 for the tiny CLIP); a fixed value
    (`tau=0.01`, `aal_tau=0.05`) where the switch sets one."""
    images, targets, text = batch
    method = resolved(tiny, "alignclip", **switches)
    visual = make_visual(tiny, method)
    class_sim = class_similarity_matrix(text, method.sls_scale)
    total, parts = compute_loss(method, visual, images, targets, text, class_sim)
    with torch.no_grad():
        out = visual(images, align=True)
    tau, aal_tau = switches.get("tau", model_tau(tiny)), switches.get("aal_tau", model_tau(tiny))
    sls, al, as_ = paper_terms(method, out, text, class_sim, tau, aal_tau)
    assert float(parts["cls_loss"]) == pytest.approx(sls, rel=1e-4)
    assert float(parts["aal_attn"]) == pytest.approx(al, rel=1e-4, abs=1e-6)
    assert float(parts["aal_sim"]) == pytest.approx(as_, rel=1e-4, abs=1e-6)
    expected = method.aal_weight * (al + as_) + method.sls_weight * sls
    assert total.item() == pytest.approx(expected, rel=1e-4)
    assert float(parts["loss"]) == pytest.approx(expected, rel=1e-4)
    assert al > 1e-3 and as_ > 1e-3  # both terms are live on this batch, so dropping either shows


@pytest.mark.parametrize("term", ["attn_term", "sim_term"])
def test_each_alignment_term_switches_off_alone(tiny, batch, term):
    images, targets, text = batch
    method = resolved(tiny, "alignclip", **{term: False})
    visual = make_visual(tiny, method)
    class_sim = class_similarity_matrix(text)
    total, parts = compute_loss(method, visual, images, targets, text, class_sim)
    with torch.no_grad():
        out = visual(images, align=True)
    sls, al, as_ = paper_terms(method, out, text, class_sim, model_tau(tiny), model_tau(tiny))
    kept = as_ if term == "attn_term" else al
    assert ("aal_attn" in parts) is (term != "attn_term") and ("aal_sim" in parts) is (term != "sim_term")
    assert total.item() == pytest.approx(kept + sls, rel=1e-4)


def test_erm_and_clipood_losses(tiny, batch):
    images, targets, text = batch
    T = rows(text)
    tau = model_tau(tiny)
    for name in ("erm", "clipood"):
        method = resolved(tiny, name)
        visual = make_visual(tiny, method)
        total, parts = compute_loss(method, visual, images, targets, text, class_similarity_matrix(text))
        with torch.no_grad():
            image = rows(visual(images))
        expected = 0.0
        for b, y in enumerate(TARGETS):
            # CLIPood's margin metric softmax: cos(I, T_c) + alpha (1 - cos(T_y, T_c)), over tau
            margin = method.margin_alpha if name == "clipood" else 0.0
            logits = [(cos(image[b], T[c]) + margin * (1 - cos(T[y], T[c]))) / tau for c in range(CLASSES)]
            expected += -math.log(softmax(logits)[y])
        assert total.item() == pytest.approx(expected / len(TARGETS), rel=1e-4), name
        assert set(parts) == {"cls_loss", "loss", "train_acc_pct"}
        # the batch accuracy in percent: 100 x (argmax of the logits written out above == target) / batch
        correct = sum(
            max(range(CLASSES), key=lambda c: cos(image[b], T[c]) + (method.margin_alpha if name == "clipood" else 0.0) * (1 - cos(T[y], T[c]))) == y
            for b, y in enumerate(TARGETS)
        )
        assert parts["train_acc_pct"].item() == pytest.approx(100.0 * correct / len(TARGETS)), name


def test_released_formulation_matches_the_released_code(tiny, batch):
    """The authors' released engine.py, written with torch.nn.functional.kl_div: margin logits x
    logit_scale.exp() of the loaded model, SLS against softmax(35 cos) with 0.9 on the target, and
    10 x (KL(G_DV || A) + KL(G_DV || G) over every class), G without temperature."""
    images, targets, text = batch
    method = resolved(tiny, "alignclip", "release")
    visual = make_visual(tiny, method)
    s35 = class_similarity_matrix(text, method.sls_scale)
    total, parts = compute_loss(method, visual, images, targets, text, s35)
    with torch.no_grad():
        out = visual(images, align=True)
    norm = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    b = len(TARGETS)
    g_dv_y = torch.einsum("bmd,bd->bm", norm(out.dv_tokens), text[targets]).softmax(-1)
    term1 = F.kl_div(out.cls_attn.log(), g_dv_y, reduction="batchmean")
    g = torch.einsum("bmd,cd->bcm", norm(out.tokens), text).softmax(-1)
    g_dv = torch.einsum("bmd,cd->bcm", norm(out.dv_tokens), text).softmax(-1)
    term2 = F.kl_div(g.log(), g_dv, reduction="sum") / b
    logits = (norm(out.embedding) - 0.3 * text[targets]) @ text.T * tiny.model.logit_scale.detach().exp()
    one_hot = F.one_hot(targets, CLASSES).float()
    soft_target = 0.9 * one_hot + (1 - one_hot) * (35 * text @ text.T).softmax(-1)[targets]
    sls = -(soft_target * logits.log_softmax(-1)).sum(-1).mean()
    assert float(parts["aal_attn"]) == pytest.approx(term1.item(), rel=1e-4)
    assert float(parts["aal_sim"]) == pytest.approx(term2.item(), rel=1e-4)
    assert float(parts["cls_loss"]) == pytest.approx(sls.item(), rel=1e-4)
    assert total.item() == pytest.approx(sls.item() + 10 * (term1.item() + term2.item()), rel=1e-4)


def test_gradients_are_finite_and_the_dv_target_gets_none(tiny, batch):
    images, targets, text = batch
    method = resolved(tiny, "alignclip")
    visual = make_visual(tiny, method)
    before = {n: p.requires_grad for n, p in visual.named_parameters()}
    try:
        for p in visual.parameters():
            p.requires_grad_(True)
            p.grad = None
        out = visual(images, align=True)
        assert out.tokens.requires_grad and not out.dv_tokens.requires_grad  # G_DV is a target
        total, _ = compute_loss(method, visual, images, targets, text, class_similarity_matrix(text))
        total.backward()
        grads = [p.grad for p in visual.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    finally:
        for name, p in visual.named_parameters():
            p.grad = None
            p.requires_grad_(before[name])


def test_the_papers_hyper_parameters_are_the_defaults():
    """Sec. 4 / A.1: tau "retained at its pre-trained setting" (the loaded CLIP's, 0.01 for OpenAI's weights),
    lambda = 1, eps = 0.1; eq. 4's G uses the same temperature; BMA on. The released code: tau from
    logit_scale.exp() too, no temperature in eq. 4."""
    method = get_method("alignclip")
    assert (method.tau, method.sls_weight, method.eps, method.aal_tau) == ("model", 1.0, 0.1, "model")
    release = get_method("alignclip", "release")
    assert (release.tau, release.aal_tau) == ("model", None)
    assert (method.aal_weight, method.smoothing, method.kl_direction, method.bma) == (1.0, "sls", "forward", True)
    assert (method.attn_term, method.sim_term, method.sim_classes) == (True, True, "target")


def test_an_unresolved_model_temperature_is_refused(tiny, batch):
    """compute_loss never guesses a temperature: `model` must have been replaced by the loaded CLIP's."""
    images, targets, text = batch
    method = get_method("alignclip")
    with pytest.raises(ValueError, match="tau, aal_tau='model' is not resolved"):
        compute_loss(method, make_visual(tiny, method), images, targets, text, class_similarity_matrix(text))


@pytest.mark.parametrize("value, expected", [("model", "model"), ("0.01", 0.01), (0.05, 0.05), ("none", None), (None, None)])
def test_temperature_switch_values(value, expected):
    assert get_method("alignclip", aal_tau=value).aal_tau == expected
    if expected is not None:
        assert get_method("alignclip", tau=value).tau == expected


@pytest.mark.parametrize("field, value", [("tau", "none"), ("tau", 0), ("tau", -0.1), ("aal_tau", "warm"), ("tau", True)])
def test_bad_temperatures_are_named(field, value):
    with pytest.raises(ValueError, match=f"{field}="):
        get_method("alignclip", **{field: value})


def test_measured_gradient_norms_are_each_terms_gradient_and_leave_the_update_alone(tiny, batch):
    """train_step's grad_norm_<term> against gradients taken independently: the same loss with the other terms
    switched off (aal_weight/sls_weight 0, a term off), one backward each; and the step's update is the one of a
    step without the measurement."""
    import copy

    from alignclip.train import make_optimizer, train_step

    images, targets, text = batch
    class_sim = class_similarity_matrix(text)
    method = resolved(tiny, "alignclip", aal_weight=2.0)

    def gradient_of(switches):
        bundle = copy.deepcopy(tiny)
        variant = resolved(bundle, "alignclip", **switches)
        visual = make_visual(bundle, variant)
        make_optimizer(bundle, visual, 1e-3, 0.1)
        total, _ = compute_loss(variant, visual, images, targets, text, class_sim)
        total.backward()
        return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in visual.parameters() if p.grad is not None))

    expected = {
        "grad_norm_cls_loss": gradient_of({"attn_term": False, "sim_term": False}),
        "grad_norm_aal_attn": gradient_of({"aal_weight": 2.0, "sls_weight": 0.0, "sim_term": False}),
        "grad_norm_aal_sim": gradient_of({"aal_weight": 2.0, "sls_weight": 0.0, "attn_term": False}),
        "grad_norm_loss": gradient_of({"aal_weight": 2.0}),
    }
    after = {}
    for measure in (True, False):
        bundle = copy.deepcopy(tiny)
        visual = make_visual(bundle, method)
        optimizer = make_optimizer(bundle, visual, 1e-3, 0.1)
        parts = train_step(method, visual, optimizer, images, targets, text, class_sim, torch.autocast("cpu", enabled=False),
                           grad_norms=measure)
        after[measure] = {k: v.clone() for k, v in visual.state_dict().items()}
        if measure:
            for name, value in expected.items():
                assert float(parts[name]) == pytest.approx(value, rel=1e-4), name
            assert expected["grad_norm_aal_attn"] > 1e-6 and expected["grad_norm_cls_loss"] > 1e-6
        else:
            assert not any(k.startswith("grad_norm") for k in parts)
    for key in after[True]:
        assert torch.equal(after[True][key], after[False][key]), key
