"""AlignCLIPVisual: an open_clip VisionTransformer that also returns what the attention alignment loss needs.

Reading of the paper (sections 3.2, C.3; fig. 2) that this module implements:

* ``cls_attn`` is A_c of eq. 3: in each of the first ``aligned_layers`` blocks, the class token's attention
  row softmax(q_cls . K^T / sqrt(d_head)) taken over the M visual tokens only (the class token's own key is
  left out of the softmax, as the sum in eq. 3 runs over m = 1..M), averaged over heads and blocks. Only
  that one row is computed (q_cls against K); the blocks themselves keep the fused attention kernel.
* The D-V branch is the second, weight-shared, no-grad path of the Siamese structure. We follow the dual-path
  construction of CLIP Surgery (Li et al. 2023), which the paper builds on: over the last ``dv_layers`` blocks
  the D-V path starts from the main path's tokens, and at each block adds ``out_proj(V)``, where V is that
  block's value projection of the *main* path's input ``ln_1(x)``: softmax(QK^T) replaced by the identity
  (the "diagonal matrix"), so each token keeps its own value. Like CLIP Surgery's new path it skips the MLP.
  It ends with ``ln_post`` and ``proj``. V is already computed by the main path; it is reused, detached, so
  the branch costs one extra ``out_proj`` per block and no second forward.
* ``branch="vvv"`` is the V-V-V ablation (appendix C.5, table 10): the D-V identity is replaced by CLIP
  Surgery's softmax(V V^T / sqrt(d_head)) V.
* ``cls_attn_norm="drop_renorm"`` is the released code's A_c: the head-averaged full attention row (class token
  included in the softmax), the class token's own entry dropped and the row renormalised.
* ``pooling="avg"`` is the average-pooling ablation (table 9): the embedding is the mean of the projected
  visual tokens instead of the class token.

* CLIP ResNets (open_clip ``ModifiedResNet``, e.g. ``RN50``; paper fig. 5) have one attention layer, the
  attention pool: a query made from the mean of the spatial features attends over [mean token, spatial
  tokens]. That query plays the class token's part: ``cls_attn`` is its attention over the M spatial tokens
  (``visual_softmax``: the softmax taken over the spatial keys; ``drop_renorm``: the full row, the mean
  token's own entry dropped, renormalised), mean over heads. ``tokens`` are the pool evaluated with every
  spatial token as the query (``c_proj`` of softmax(q_i K^T) V, the analogue of a ViT's last-layer tokens);
  the D-V tokens replace softmax(QK^T) by the identity: ``c_proj(v_proj(x_i))``, as CLIP Surgery's ResNet
  path. With a single attention layer, ``aligned_layers`` and ``dv_layers`` above 1 select that layer.
  BatchNorm layers stay in eval mode while training (running statistics of pre-training), as CLIPood and the
  released code, which train with the whole encoder in eval mode.

At inference ``forward(images)`` is the plain open_clip forward (identical to ``encode_image``); nothing of
the alignment machinery runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AlignOutput:
    embedding: torch.Tensor  # [B, D] image embedding (not normalised), as encode_image
    cls_attn: torch.Tensor | None  # [B, M] class-token attention over visual tokens, eq. 3 (None if aligned_layers=0)
    tokens: torch.Tensor  # [B, M, D] visual tokens through ln_post and proj, main branch (with gradient)
    dv_tokens: torch.Tensor | None  # [B, M, D] the same from the D-V branch (no gradient); None if dv_layers=0


class AlignCLIPVisual(nn.Module):
    def __init__(
        self,
        visual: nn.Module,
        aligned_layers: int = 4,
        dv_layers: int | None = None,
        branch: str = "dv",
        pooling: str = "cls",
        cls_attn_norm: str = "visual_softmax",
    ):
        super().__init__()
        self.attention_pool = _is_attention_pool_resnet(visual)
        if self.attention_pool:
            depth = 1  # the attention pool is the only attention layer
            aligned_layers, dv_layers = min(aligned_layers, 1), (1 if dv_layers is None else min(dv_layers, 1))
        else:
            if not hasattr(visual, "transformer"):
                raise ValueError(
                    f"AlignCLIPVisual supports open_clip VisionTransformers and attention-pooled CLIP ResNets, "
                    f"not {type(visual).__name__}"
                )
            depth = len(visual.transformer.resblocks)
            if not getattr(visual.transformer, "batch_first", True):
                raise ValueError("AlignCLIPVisual needs a batch-first open_clip VisionTransformer")
            if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
                raise ValueError("AlignCLIPVisual supports ViTs with class-token pooling and ln_post before pooling")
        if not 0 <= aligned_layers <= depth:
            raise ValueError(f"aligned_layers={aligned_layers}: expected 0..{depth} (the model has {depth} blocks)")
        dv_layers = depth // 2 if dv_layers is None else dv_layers
        if not 0 <= dv_layers <= depth:
            raise ValueError(f"dv_layers={dv_layers}: expected 0..{depth}")
        if branch not in ("dv", "vvv"):
            raise ValueError(f"branch={branch!r}: expected 'dv' (identity attention) or 'vvv' (CLIP Surgery V-V-V)")
        if pooling not in ("cls", "avg"):
            raise ValueError(f"pooling={pooling!r}: expected 'cls' (class token) or 'avg' (mean of visual tokens)")
        if cls_attn_norm not in ("visual_softmax", "drop_renorm"):
            raise ValueError(f"cls_attn_norm={cls_attn_norm!r}: expected 'visual_softmax' or 'drop_renorm'")
        self.visual = visual
        self.cls_attn_norm = cls_attn_norm
        self.aligned_layers = aligned_layers
        self.dv_layers = dv_layers
        self.branch = branch
        self.pooling = pooling

    @property
    def depth(self) -> int:
        """Attention layers of the encoder: a ViT's blocks, or 1 (the attention pool) for a CLIP ResNet."""
        return attention_depth(self.visual)

    def train(self, mode: bool = True):
        super().train(mode)
        # CLIPood and the released code fine-tune with the encoder in eval mode: BatchNorm (CLIP ResNets) keeps
        # its pre-training statistics instead of batch statistics of a 36-image batch. (ViTs have no BatchNorm.)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        x = self.visual.ln_post(x)
        return x @ self.visual.proj if self.visual.proj is not None else x

    def forward(self, images: torch.Tensor, align: bool = False):
        if not align:
            if self.pooling == "cls":
                return self.visual(images)
            return self._forward_tokens(images).mean(dim=1)
        return self._forward_align(images)

    def _forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        if self.attention_pool:
            return self._forward_align_pool(images).tokens
        x = self.visual.transformer(self.visual._embeds(images))
        return self._project(x[:, 1:])

    def _forward_align(self, images: torch.Tensor) -> AlignOutput:
        if self.attention_pool:
            return self._forward_align_pool(images)
        visual = self.visual
        x = visual._embeds(images)
        depth = self.depth
        dv_start = depth - self.dv_layers
        attn_sum = None
        dv = None
        for index, block in enumerate(visual.transformer.resblocks):
            want_attn = index < self.aligned_layers
            want_value = index >= dv_start
            if not (want_attn or want_value):
                x = block(x)
                continue
            if want_value and dv is None:
                dv = x.detach()  # the D-V path starts from the main path's tokens where it begins
            x, cls_row, value = self._block(block, x, want_attn, want_value, self.cls_attn_norm)
            if cls_row is not None:
                attn_sum = cls_row if attn_sum is None else attn_sum + cls_row
            if value is not None:
                with torch.no_grad():
                    dv = dv + block.ls_1(self._dv_attention(block, value))
        tokens_all = self._project(x)
        tokens = tokens_all[:, 1:]
        embedding = tokens_all[:, 0] if self.pooling == "cls" else tokens.mean(dim=1)
        dv_tokens = None
        if dv is not None:
            with torch.no_grad():
                dv_tokens = self._project(dv[:, 1:])
        cls_attn = attn_sum / self.aligned_layers if attn_sum is not None else None
        return AlignOutput(embedding, cls_attn, tokens, dv_tokens)

    @staticmethod
    def _block(block: nn.Module, x: torch.Tensor, want_attn: bool, want_value: bool, cls_attn_norm: str):
        """One open_clip ResidualAttentionBlock, unrolled so that q, k and v are at hand.

        Same computation as ``block(x)`` (nn.MultiheadAttention's in_proj -> scaled dot-product attention ->
        out_proj), with the fused SDPA kernel for the block itself.
        """
        attn: nn.MultiheadAttention = block.attn
        batch, length, width = x.shape
        heads = attn.num_heads
        head_dim = width // heads
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, dh]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, length, width)
        x = x + block.ls_1(attn.out_proj(out))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        cls_row = _cls_attention(q, k, cls_attn_norm) if want_attn else None
        value = v.detach() if want_value else None
        return x, cls_row, value

    def _forward_align_pool(self, images: torch.Tensor) -> AlignOutput:
        """A CLIP ResNet: the trunk, then its attention pool unrolled (see the module docstring)."""
        visual = self.visual
        pool = visual.attnpool
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
        x = x.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pool.positional_embedding.to(x.dtype)
        batch, length, width = x.shape
        heads = pool.num_heads
        head_dim = width // heads

        def split(t):  # [B, N, C] -> [B, H, N, dh]
            return t.view(batch, length, heads, head_dim).transpose(1, 2)

        def merge(t):  # [B, H, N, dh] -> [B, N, C]
            return t.transpose(1, 2).reshape(batch, length, width)

        q, k, v = split(pool.q_proj(x)), split(pool.k_proj(x)), split(pool.v_proj(x))
        # every token as a query: row 0 (the mean token's query) is exactly the pool's output
        out = pool.c_proj(merge(F.scaled_dot_product_attention(q, k, v)))
        tokens = out[:, 1:]
        embedding = out[:, 0] if self.pooling == "cls" else tokens.mean(dim=1)
        cls_attn = _cls_attention(q, k, self.cls_attn_norm) if self.aligned_layers else None
        dv_tokens = None
        if self.dv_layers:
            with torch.no_grad():
                value = v.detach()
                if self.branch == "vvv":
                    value = F.scaled_dot_product_attention(value, value, value)
                dv_tokens = pool.c_proj(merge(value))[:, 1:]  # identity attention: each token keeps its value
        return AlignOutput(embedding, cls_attn, tokens, dv_tokens)

    def _dv_attention(self, block: nn.Module, value: torch.Tensor) -> torch.Tensor:
        """The D-V path's attention output from the main path's per-head values [B, H, N, dh]."""
        batch, heads, length, head_dim = value.shape
        if self.branch == "vvv":
            value = F.scaled_dot_product_attention(value, value, value)
        # identity attention (D-V): each token keeps its own value.
        merged = value.transpose(1, 2).reshape(batch, length, heads * head_dim)
        return block.attn.out_proj(merged)


def _cls_attention(q: torch.Tensor, k: torch.Tensor, cls_attn_norm: str) -> torch.Tensor:
    """The first token's attention row over the other tokens, mean over heads [B, M]; q, k: [B, H, N, dh]."""
    head_dim = q.shape[-1]
    # Only the first query's row: [B, H, 1, dh] x [B, H, dh, N] -> [B, H, N].
    logits = (q[:, :, :1] @ k.transpose(-1, -2)).squeeze(2).float() * head_dim**-0.5
    if cls_attn_norm == "visual_softmax":  # eq. 3: softmax over the M visual tokens, then mean over heads
        return logits[..., 1:].softmax(dim=-1).mean(dim=1)
    # released: head-averaged full attention row, the first token's own entry dropped, L1-renormalised
    row = logits.softmax(dim=-1).mean(dim=1)[:, 1:]
    return row / row.sum(dim=-1, keepdim=True)


def attention_depth(visual: nn.Module) -> int:
    """Attention layers of an open_clip image encoder that AAL can align: a ViT's blocks, 1 for a CLIP ResNet."""
    return 1 if _is_attention_pool_resnet(visual) else len(visual.transformer.resblocks)


def _is_attention_pool_resnet(visual: nn.Module) -> bool:
    pool = getattr(visual, "attnpool", None)
    return pool is not None and all(hasattr(pool, n) for n in ("q_proj", "k_proj", "v_proj", "c_proj", "positional_embedding"))
