"""AlignCLIPVisual against a naive re-computation through open_clip's own modules (hooks, loops over heads)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from alignclip import losses
from alignclip.model import AlignCLIPVisual


@pytest.fixture()
def visual(tiny):
    v = copy.deepcopy(tiny.model.visual).eval()  # perturbed below: the session's tiny CLIP stays as loaded
    torch.manual_seed(1)
    with torch.no_grad():  # perturb so that the class token's attention is not near-uniform
        for p in v.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return v


@pytest.fixture()
def images(tiny):
    torch.manual_seed(2)
    return torch.randn(3, 3, tiny.image_size, tiny.image_size)


def block_inputs(visual, images):
    """Inputs of every block of the ordinary forward, captured with forward pre-hooks."""
    captured = []
    hooks = [b.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach())) for b in visual.transformer.resblocks]
    with torch.no_grad():
        out = visual(images)
    for h in hooks:
        h.remove()
    return captured, out


def naive_cls_attn(visual, inputs, layers, renorm=False):
    rows = []
    for block, x in zip(list(visual.transformer.resblocks)[:layers], inputs):
        attn = block.attn
        heads, width = attn.num_heads, x.shape[-1]
        dh = width // heads
        y = block.ln_1(x)
        wq, wk, _ = attn.in_proj_weight.chunk(3)
        bq, bk, _ = attn.in_proj_bias.chunk(3)
        q, k = y @ wq.T + bq, y @ wk.T + bk
        per_head = []
        for h in range(heads):
            qh, kh = q[:, 0, h * dh : (h + 1) * dh], k[:, :, h * dh : (h + 1) * dh]
            scores = torch.einsum("bd,bnd->bn", qh, kh) / dh**0.5
            if renorm:
                per_head.append(scores.softmax(-1))
            else:
                per_head.append(scores[:, 1:].softmax(-1))
        row = torch.stack(per_head).mean(0)
        if renorm:
            row = row[:, 1:] / row[:, 1:].sum(-1, keepdim=True)
        rows.append(row)
    return torch.stack(rows).mean(0)


def naive_dv_tokens(visual, inputs, dv_layers, vvv=False):
    blocks = list(visual.transformer.resblocks)
    start = len(blocks) - dv_layers
    dv = inputs[start].clone()
    for block, x in zip(blocks[start:], inputs[start:]):
        attn = block.attn
        _, _, wv = attn.in_proj_weight.chunk(3)
        _, _, bv = attn.in_proj_bias.chunk(3)
        v = block.ln_1(x) @ wv.T + bv  # values of the main path's input
        if vvv:
            heads, dh = attn.num_heads, v.shape[-1] // attn.num_heads
            parts = []
            for h in range(heads):
                vh = v[..., h * dh : (h + 1) * dh]
                parts.append((vh @ vh.transpose(1, 2) / dh**0.5).softmax(-1) @ vh)
            v = torch.cat(parts, -1)
        dv = dv + attn.out_proj(v)  # identity attention, no MLP
    return visual.ln_post(dv[:, 1:]) @ visual.proj


def test_plain_forward_is_encode_image(tiny, images):
    wrapped = AlignCLIPVisual(tiny.model.visual)
    with torch.no_grad():
        assert torch.equal(wrapped(images), tiny.model.encode_image(images))


def test_align_outputs_match_naive_recomputation(visual, images):
    inputs, plain = block_inputs(visual, images)
    wrapped = AlignCLIPVisual(visual, aligned_layers=4, dv_layers=3)
    with torch.no_grad():
        out = wrapped(images, align=True)
    assert out.embedding.shape == plain.shape
    assert torch.allclose(out.embedding, plain, atol=1e-5)
    assert out.cls_attn.shape == (3, 16)
    assert torch.allclose(out.cls_attn.sum(-1), torch.ones(3), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(out.cls_attn, naive_cls_attn(visual, inputs, 4), atol=1e-5)
        final = visual.transformer(visual._embeds(images))
        assert torch.allclose(out.tokens, visual.ln_post(final[:, 1:]) @ visual.proj, atol=1e-5)
        assert torch.allclose(out.dv_tokens, naive_dv_tokens(visual, inputs, 3), atol=1e-5)
    assert wrapped.dv_layers == 3


def test_default_dv_layers_is_half_depth(visual):
    assert AlignCLIPVisual(visual).dv_layers == 3


def test_released_cls_attention_and_vvv_branch(visual, images):
    inputs, _ = block_inputs(visual, images)
    wrapped = AlignCLIPVisual(visual, aligned_layers=5, dv_layers=2, branch="vvv", cls_attn_norm="drop_renorm")
    with torch.no_grad():
        out = wrapped(images, align=True)
        assert torch.allclose(out.cls_attn, naive_cls_attn(visual, inputs, 5, renorm=True), atol=1e-5)
        assert torch.allclose(out.dv_tokens, naive_dv_tokens(visual, inputs, 2, vvv=True), atol=1e-5)
    # nn.MultiheadAttention's own head-averaged weights give the same released A_c for the first block
    block = visual.transformer.resblocks[0]
    with torch.no_grad():
        _, weights = block.attn(block.ln_1(inputs[0]), block.ln_1(inputs[0]), block.ln_1(inputs[0]), need_weights=True)
        row = weights[:, 0, 1:] / weights[:, 0, 1:].sum(-1, keepdim=True)
        single = AlignCLIPVisual(visual, aligned_layers=1, dv_layers=1, cls_attn_norm="drop_renorm")(images, align=True)
        assert torch.allclose(single.cls_attn, row, atol=1e-5)


def test_average_pooling(visual, images):
    wrapped = AlignCLIPVisual(visual, pooling="avg")
    with torch.no_grad():
        out = wrapped(images, align=True)
        assert torch.allclose(wrapped(images), out.tokens.mean(1), atol=1e-5)
        assert torch.allclose(out.embedding, out.tokens.mean(1), atol=1e-6)


def test_gradients(visual, images):
    wrapped = AlignCLIPVisual(visual, aligned_layers=2, dv_layers=3).train()
    for p in wrapped.parameters():
        p.requires_grad_(True)
    out = wrapped(images, align=True)
    assert not out.dv_tokens.requires_grad  # the D-V branch is a target
    text = torch.randn(3, out.tokens.shape[-1])
    g_dv = losses.token_text_similarity(out.dv_tokens, text)
    losses.kl_divergence(out.cls_attn, g_dv).mean().backward()  # AL alone (eq. 6, first term)
    blocks = visual.transformer.resblocks
    width = blocks[0].attn.embed_dim
    for index in range(2):  # AL reaches q and k of the aligned layers
        grad = blocks[index].attn.in_proj_weight.grad
        assert grad[:width].abs().sum() > 0 and grad[width : 2 * width].abs().sum() > 0
    for index in range(2, len(blocks)):  # ... and nothing after them
        grad = blocks[index].attn.in_proj_weight.grad
        assert grad is None or grad.abs().sum() == 0


def test_bad_arguments_are_named(visual):
    with pytest.raises(ValueError, match="aligned_layers=9"):
        AlignCLIPVisual(visual, aligned_layers=9)
    with pytest.raises(ValueError, match="branch="):
        AlignCLIPVisual(visual, branch="qkv")
