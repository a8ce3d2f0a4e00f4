"""The training objective of every method, assembled from the loss functions and a MethodConfig."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignclip import losses
from alignclip.methods import MODEL_TAU, TEMPERATURES, MethodConfig
from alignclip.model import AlignCLIPVisual


def classification_logits(method: MethodConfig, image: torch.Tensor, text: torch.Tensor, targets: torch.Tensor):
    if method.classifier == "margin":
        return losses.margin_logits(image, text, targets, method.margin_alpha, method.tau)
    return losses.cosine_logits(image, text, method.tau)


def classification_loss(method: MethodConfig, logits, targets, class_sim) -> torch.Tensor:
    if method.smoothing == "sls":
        return losses.semantic_label_smoothing_loss(logits, targets, class_sim, method.eps)
    if method.smoothing == "sls_release":
        return losses.release_sls_loss(logits, targets, class_sim, on=1.0 - method.eps)
    if method.smoothing == "ls":
        return losses.label_smoothing_loss(logits, targets, method.eps)
    return F.cross_entropy(logits.float(), targets)


def target_similarity(method: MethodConfig, tokens: torch.Tensor, target_text: torch.Tensor) -> torch.Tensor:
    """G of eq. 4 for each image's own class: the softmax over an image's tokens [B, M, D] of their similarity to
    its class's text feature [B, D], at the method's ``aal_tau``."""
    return losses.token_text_similarity(tokens, target_text, method.aal_tau)


def attention_maps(method: MethodConfig, visual: AlignCLIPVisual, images: torch.Tensor, text: torch.Tensor,
                   targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three maps the alignment loss compares, each [B, M] over an image's tokens, for the image's own class:
    ``A_c`` the class-token attention, ``G`` the token/text similarity of the aligned tokens, ``G_DV`` that of the
    D-V branch (eq. 2-4). The forward pass and the maps are the loss's own (``loss_terms``, ``alignment_terms``)."""
    out = visual(images, align=True)
    target_text = text[targets]
    return {"A_c": out.cls_attn, "G": target_similarity(method, out.tokens, target_text),
            "G_DV": target_similarity(method, out.dv_tokens, target_text)}


def alignment_terms(method: MethodConfig, out, text: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """AL (class-token attention vs G_DV) and AS (G vs G_DV) of the attention alignment loss."""
    if out.dv_tokens is None:
        raise ValueError("the attention alignment loss needs the D-V branch: dv_layers must be > 0")
    terms: dict[str, torch.Tensor] = {}
    target_text = text[targets]  # [B, D]
    g_dv_y = target_similarity(method, out.dv_tokens, target_text)  # [B, M], no grad
    if method.attn_term:
        if method.kl_direction == "forward":  # eq. 6: sum A log(A / G_DV)
            terms["aal_attn"] = losses.kl_divergence(out.cls_attn, g_dv_y).mean()
        else:  # released: KL(G_DV || A), batch mean
            terms["aal_attn"] = losses.kl_batchmean(g_dv_y, out.cls_attn)
    if method.sim_term:
        if method.sim_classes == "all":
            classes = text[None].expand(out.tokens.shape[0], -1, -1)  # [B, C, D]
            g = losses.token_text_similarity(out.tokens, classes, method.aal_tau)
            with torch.no_grad():
                g_dv = losses.token_text_similarity(out.dv_tokens, classes, method.aal_tau)
        else:
            g = target_similarity(method, out.tokens, target_text)
            g_dv = g_dv_y
        if method.kl_direction == "forward":
            kl = losses.kl_divergence(g, g_dv)  # [B], or [B, C] with every class
            terms["aal_sim"] = (kl.sum(dim=-1) if kl.dim() == 2 else kl).mean()
        else:
            terms["aal_sim"] = losses.kl_batchmean(g_dv, g)
    return terms


def compute_loss(
    method: MethodConfig,
    visual: AlignCLIPVisual,
    images: torch.Tensor,
    targets: torch.Tensor,
    text: torch.Tensor,
    class_sim: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step's loss and its logged parts (``loss_terms`` without the terms' graphs)."""
    total, parts, _ = loss_terms(method, visual, images, targets, text, class_sim)
    return total, parts


def term_names(method: MethodConfig) -> list[str]:
    """The terms of the method's total loss, as ``loss_terms`` names them: ``cls_loss`` (CE, LS or SLS) and, with
    the alignment loss, ``aal_attn`` and ``aal_sim`` where switched on."""
    names = ["cls_loss"]
    if method.aal:
        names += [name for name, on in (("aal_attn", method.attn_term), ("aal_sim", method.sim_term)) if on]
    return names


def loss_terms(
    method: MethodConfig,
    visual: AlignCLIPVisual,
    images: torch.Tensor,
    targets: torch.Tensor,
    text: torch.Tensor,
    class_sim: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One step's loss, its logged parts (detached tensors on the loss's device), and each term as it enters the
    total (weight included, graph kept; named as ``term_names``), whose gradients train_step measures on log
    steps. ``text`` holds the frozen class text features [C, D]. ``method``'s temperatures are numbers: ``model`` is resolved against the loaded
    CLIP first (``method.for_model(bundle.tau)``, as train.setup does)."""
    unresolved = [f for f in TEMPERATURES if getattr(method, f) == MODEL_TAU]
    if unresolved:
        raise ValueError(f"{', '.join(unresolved)}={MODEL_TAU!r} is not resolved: use method.for_model(bundle.tau), "
                         "the loaded CLIP's pre-trained temperature")
    if method.aal:
        out = visual(images, align=True)
        image = out.embedding
    else:
        out, image = None, visual(images)
    logits = classification_logits(method, image, text, targets)
    cls_loss = classification_loss(method, logits, targets, class_sim)
    total = method.sls_weight * cls_loss if method.smoothing in ("sls", "sls_release") else cls_loss
    parts = {"cls_loss": cls_loss.detach()}
    contributions = {"cls_loss": total}
    if method.aal:
        terms = alignment_terms(method, out, text, targets)
        aal = sum(terms.values()) if terms else torch.zeros((), device=images.device)
        total = total + method.aal_weight * aal
        contributions.update({k: method.aal_weight * v for k, v in terms.items()})
        parts.update({k: v.detach() for k, v in terms.items()})
        parts["aal"] = aal.detach()
    parts["loss"] = total.detach()
    with torch.no_grad():
        # a percentage, like every accuracy the project reports (test_acc_pct)
        parts["train_acc_pct"] = 100.0 * (logits.argmax(dim=-1) == targets).float().mean()
    # parts: detached 0-d tensors, read by the caller every few steps, never a host sync per step
    return total, parts, contributions
