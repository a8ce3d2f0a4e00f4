"""AAL on the other backbones of the paper's fig. 5: CLIP-RN50 (attention pool) and ViT-B/32.

Tiny random-weight models of those architectures (``tiny-rn50``, ``tiny-vit-b-32``, open_clip configs in
alignclip/resources/model_configs). RN50's A_c, tokens and embedding are checked against what open_clip's own
AttentionPool2d computes (its attention weights, taken from inside its forward); ViT-B/32 against the same naive
re-computation as the ViT-B/16-shaped ``tiny`` model.
"""

import pytest
import torch
import torch.nn.functional as F

from alignclip import losses
from alignclip.model import AlignCLIPVisual
from alignclip.presets import load_clip
from tests.test_model import block_inputs, naive_cls_attn, naive_dv_tokens


def perturbed(name):
    bundle = load_clip(name)
    visual = bundle.model.visual.eval()
    torch.manual_seed(1)
    with torch.no_grad():  # perturb so that attention is not near-uniform
        for p in visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for module in visual.modules():  # RN50: unit BatchNorm gains (open_clip zero-initialises bn3), so the
            if isinstance(module, torch.nn.BatchNorm2d):  # features depend on the image, and a sharper pool
                module.weight.fill_(1.0)
        if hasattr(visual, "attnpool"):
            visual.attnpool.q_proj.weight.mul_(8.0)
            visual.attnpool.k_proj.weight.mul_(8.0)
    return bundle, visual


@pytest.fixture(scope="module")
def rn50():
    return perturbed("tiny-rn50")


@pytest.fixture(scope="module")
def vit_b32():
    return perturbed("tiny-vit-b-32")


def images_for(bundle, n=3):
    """Smooth random images (white noise would average out in the ResNet's pooling stages)."""
    torch.manual_seed(2)
    coarse = torch.randn(n, 3, 6, 6)
    return F.interpolate(coarse, size=bundle.image_size, mode="bilinear", align_corners=False)


def attention_pool_internals(visual, images):
    """Run the plain encoder and capture, from inside open_clip's AttentionPool2d, its input tokens, its per-head
    attention weights [B, H, N, N] and its output for every query [B, N, D] (it returns only query 0)."""
    captured = {}
    original = F.multi_head_attention_forward

    def spy(*args, **kwargs):
        kwargs.update(need_weights=True, average_attn_weights=False)
        out, weights = original(*args, **kwargs)
        captured.update(tokens=kwargs["query"].transpose(0, 1), weights=weights, out=out.transpose(0, 1))
        return out, weights

    F.multi_head_attention_forward = spy
    try:
        with torch.no_grad():
            embedding = visual(images)
    finally:
        F.multi_head_attention_forward = original
    return captured, embedding


def test_rn50_plain_forward_is_encode_image(rn50):
    bundle, visual = rn50
    images = images_for(bundle)
    wrapped = AlignCLIPVisual(visual)
    with torch.no_grad():
        assert torch.equal(wrapped(images), bundle.model.encode_image(images))


def test_rn50_cls_attention_is_the_attention_pool_query_row(rn50):
    bundle, visual = rn50
    images = images_for(bundle)
    pool, embedding = attention_pool_internals(visual, images)
    weights = pool["weights"][:, :, 0, :]  # the mean-token query's row, per head, over [mean, spatial tokens]
    spatial = visual.attnpool.positional_embedding.shape[0] - 1
    assert weights.shape[-1] == spatial + 1
    with torch.no_grad():
        paper = AlignCLIPVisual(visual, aligned_layers=4)(images, align=True)
        release = AlignCLIPVisual(visual, aligned_layers=5, cls_attn_norm="drop_renorm")(images, align=True)
    # eq. 3: the softmax over the spatial keys only = the full softmax restricted to them and renormalised, per
    # head (exp(l_i) / sum_spatial exp(l_j)), then the mean over heads
    per_head = weights[..., 1:] / weights[..., 1:].sum(-1, keepdim=True)
    assert torch.allclose(paper.cls_attn, per_head.mean(1), atol=1e-5)
    # released: head mean of the full row, the query token's own entry dropped, then renormalised
    averaged = weights.mean(1)[:, 1:]
    assert torch.allclose(release.cls_attn, averaged / averaged.sum(-1, keepdim=True), atol=1e-5)
    assert not torch.allclose(paper.cls_attn, release.cls_attn, atol=1e-4)  # the two readings differ here
    # the embedding is the pool's output for its query; tokens are its output for every spatial query
    assert torch.allclose(paper.embedding, embedding, atol=1e-5)
    assert torch.allclose(paper.tokens, pool["out"][:, 1:], atol=1e-5)
    assert paper.cls_attn.shape == (3, spatial)


def test_rn50_dv_tokens_are_identity_attention_of_the_pool(rn50):
    bundle, visual = rn50
    images = images_for(bundle)
    pool_io, _ = attention_pool_internals(visual, images)
    x = pool_io["tokens"]  # [B, N, C]: mean token + spatial tokens, with positional embedding
    pool = visual.attnpool
    with torch.no_grad():
        out = AlignCLIPVisual(visual)(images, align=True)
        value = x @ pool.v_proj.weight.T + pool.v_proj.bias
        expected = (value @ pool.c_proj.weight.T + pool.c_proj.bias)[:, 1:]
        assert torch.allclose(out.dv_tokens, expected, atol=1e-5)
        vvv = AlignCLIPVisual(visual, branch="vvv")(images, align=True)
        heads, dh = pool.num_heads, value.shape[-1] // pool.num_heads
        parts = []
        for h in range(heads):
            vh = value[..., h * dh : (h + 1) * dh]
            parts.append((vh @ vh.transpose(1, 2) / dh**0.5).softmax(-1) @ vh)
        expected_vvv = (torch.cat(parts, -1) @ pool.c_proj.weight.T + pool.c_proj.bias)[:, 1:]
        assert torch.allclose(vvv.dv_tokens, expected_vvv, atol=1e-5)


def test_rn50_has_one_attention_layer(rn50):
    _, visual = rn50
    wrapped = AlignCLIPVisual(visual, aligned_layers=5, dv_layers=6)
    assert (wrapped.depth, wrapped.aligned_layers, wrapped.dv_layers) == (1, 1, 1)
    off = AlignCLIPVisual(visual, aligned_layers=0, dv_layers=0)
    assert (off.aligned_layers, off.dv_layers) == (0, 0)


def test_rn50_alignment_gradient_reaches_query_and_key_and_batchnorm_keeps_statistics(rn50):
    bundle, visual = rn50
    images = images_for(bundle)
    wrapped = AlignCLIPVisual(visual).train()
    bn = visual.bn1
    assert not bn.training  # BatchNorm stays in eval mode while training (CLIPood, released code)
    before = bn.running_mean.clone()
    for p in wrapped.parameters():
        p.requires_grad_(True)
        p.grad = None
    out = wrapped(images, align=True)
    assert not out.dv_tokens.requires_grad
    g_dv = losses.token_text_similarity(out.dv_tokens, torch.randn(3, out.tokens.shape[-1]))
    losses.kl_divergence(out.cls_attn, g_dv).mean().backward()
    pool = visual.attnpool
    assert pool.q_proj.weight.grad.abs().sum() > 0 and pool.k_proj.weight.grad.abs().sum() > 0
    assert visual.layer4[0].conv1.weight.grad.abs().sum() > 0  # ... and the trunk below the pool
    assert pool.c_proj.weight.grad is None or pool.c_proj.weight.grad.abs().sum() == 0  # A_c does not use c_proj
    assert torch.equal(bn.running_mean, before)
    visual.eval()


def test_vit_b32_align_outputs_match_naive_recomputation(vit_b32):
    bundle, visual = vit_b32
    images = images_for(bundle)
    inputs, plain = block_inputs(visual, images)
    tokens = (bundle.image_size // 32) ** 2
    for norm, renorm in (("visual_softmax", False), ("drop_renorm", True)):
        wrapped = AlignCLIPVisual(visual, aligned_layers=3, dv_layers=2, cls_attn_norm=norm)
        with torch.no_grad():
            out = wrapped(images, align=True)
            assert out.cls_attn.shape == (3, tokens)
            assert torch.allclose(out.embedding, plain, atol=1e-5)
            assert torch.allclose(out.cls_attn, naive_cls_attn(visual, inputs, 3, renorm=renorm), atol=1e-5)
            assert torch.allclose(out.dv_tokens, naive_dv_tokens(visual, inputs, 2), atol=1e-5)
    with torch.no_grad():
        vvv = AlignCLIPVisual(visual, dv_layers=2, branch="vvv")(images, align=True)
        assert torch.allclose(vvv.dv_tokens, naive_dv_tokens(visual, inputs, 2, vvv=True), atol=1e-5)


@pytest.mark.parametrize("formulation", ["paper", "release"])
def test_rn50_trains_with_aal_through_the_training_loop(digits_prepared, tmp_path, formulation):
    import json

    import pandas as pd

    from alignclip.classifier import load_trained
    from alignclip.train import TrainSettings, train

    settings = TrainSettings(
        method="alignclip", formulation=formulation, model="tiny-rn50", test_domain="rotated_0", steps=3,
        batch_size=2, lr=1e-4, hflip=False, progress=False,
    )
    train(digits_prepared, tmp_path, settings)
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert len(log) == 3 and (log["aal"] > 0).all() and log["loss"].notna().all()
    summary = json.loads((tmp_path / "train.json").read_text())
    assert summary["attention_layers"] == {"aligned": 1, "dv": 1}  # what was aligned, not the 4 or 5 asked
    _, visual, state = load_trained(tmp_path / "model.pt", "cpu")
    assert state.architecture == "alignclip-tiny-rn50" and visual.attention_pool
