"""Loss functions of AlignCLIP (paper formulation), CLIPood, and the authors' released formulation.

Every function takes plain tensors; objective.compute_loss assembles them for a MethodConfig, and the tests check
that assembled loss (the one training runs) against the paper's equations written out independently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_TINY = torch.finfo(torch.float32).tiny


def cosine_logits(image_features: torch.Tensor, text_features: torch.Tensor, tau: float = 0.01) -> torch.Tensor:
    """Eq. 1: cos(I_x, T_c) / tau for every class c."""
    return F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T / tau


def margin_logits(
    image_features: torch.Tensor, text_features: torch.Tensor, targets: torch.Tensor, alpha: float, tau: float = 0.01
) -> torch.Tensor:
    """CLIPood's margin metric softmax: (cos(I, T_c) - alpha * cos(T_y, T_c)) / tau.

    CLIPood writes it as S(I, T_c) + alpha * (1 - S(T_y, T_c)); the constant alpha cancels in the softmax. The
    released code computes the same thing as (norm(I) - alpha * T_y) . T_c.
    """
    text = F.normalize(text_features, dim=-1)
    image = F.normalize(image_features, dim=-1)
    return (image - alpha * text[targets]) @ text.T / tau


def semantic_label_smoothing_loss(
    logits: torch.Tensor, targets: torch.Tensor, class_sim: torch.Tensor, eps: float = 0.1
) -> torch.Tensor:
    """Eq. 8-9: batch mean of (1 - eps) * CE(logits, y) + eps * (-sum_j S[y, j] log softmax(logits)_j)."""
    log_probs = logits.float().log_softmax(dim=-1)
    ce = -log_probs.gather(1, targets[:, None]).squeeze(1)
    semantic = -(class_sim[targets].to(log_probs.dtype) * log_probs).sum(dim=-1)
    return ((1.0 - eps) * ce + eps * semantic).mean()


def label_smoothing_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Eq. 7, plain label smoothing (uniform target), for the SLS-vs-LS ablation (fig. 3d)."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=eps)


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_i p_i log(p_i / q_i) over the last dim; 0 log 0 = 0 and q is floored, so zeros are safe."""
    p = p.float()
    # p * log(max(p, tiny)) is 0 at p = 0 with a finite gradient (xlogy(p, p) has a NaN one there).
    return (p * (torch.log(p.clamp_min(_TINY)) - torch.log(q.float().clamp_min(_TINY)))).sum(dim=-1)


def token_text_similarity(tokens: torch.Tensor, text: torch.Tensor, tau: float | None = 0.01) -> torch.Tensor:
    """Eq. 4: softmax over the M tokens of cos(token_i, T) / tau.

    ``tokens`` [B, M, D]; ``text`` [B, D] (one class per image) -> [B, M], or [B, K, D] (K classes per image)
    -> [B, K, M]. ``tau=None`` means no temperature (the released code).
    """
    tokens = F.normalize(tokens.float(), dim=-1)
    text = F.normalize(text.float(), dim=-1)
    if text.dim() == 2:
        sims = torch.einsum("bmd,bd->bm", tokens, text)
    else:
        sims = torch.einsum("bmd,bkd->bkm", tokens, text)
    if tau is not None:
        sims = sims / tau
    return sims.softmax(dim=-1)


# --- the authors' released formulation (formulation: release) -------------------------------------------


def release_sls_loss(logits: torch.Tensor, targets: torch.Tensor, class_sim: torch.Tensor, on: float = 0.9) -> torch.Tensor:
    """Released SLS: target = on * one_hot(y) + (1 - one_hot(y)) * S[y] (not renormalised); soft CE, batch mean."""
    one_hot = F.one_hot(targets, logits.shape[-1]).to(class_sim.dtype)
    target = on * one_hot + (1 - one_hot) * class_sim[targets]
    return -(target * logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()


def kl_batchmean(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """KL(target || pred) summed over everything but the batch and divided by the batch size
    (torch's ``F.kl_div(pred.log(), target, reduction='batchmean')``)."""
    return kl_divergence(target.detach(), pred).sum() / target.shape[0]
