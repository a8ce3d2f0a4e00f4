"""Beta Moving Average (CLIPood, Shu et al. 2023): a weighted average of every iterate of the weights.

Step k (k = 0 is the initial model) gets weight w_k = Beta(beta, beta).pdf((k + 0.5) / (total_steps + 1)), so
with beta < 1 the start (close to the pre-trained model) and the end of training weigh most. After t updates
the averaged model is sum_{k<=t} w_k theta_k / sum_{k<=t} w_k, kept incrementally in one copy of the weights.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def beta_pdf(x: float, a: float, b: float) -> float:
    log_norm = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) - log_norm)


class BetaMovingAverage:
    def __init__(self, model: nn.Module, total_steps: int, beta: float = 0.5):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.total_steps = total_steps
        self.beta = beta
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.step = 0
        self.total_weight = self.weight(0)
        self._paired = None  # (model, averaged tensors, live tensors): built on the first update, reused after

    def weight(self, k: int) -> float:
        return beta_pdf((k + 0.5) / (self.total_steps + 1), self.beta, self.beta)

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Fold the current weights in as step ``self.step + 1``; returns that step's weight w_k.

        Works on the tensors themselves (parameters and buffers, not ``state_dict()`` copies) with one fused
        multi-tensor ``torch._foreach_lerp_`` for the floating-point ones: a handful of kernel launches per step
        instead of one Python-level op per tensor.
        """
        self.step += 1
        w = self.weight(self.step)
        ratio = w / (self.total_weight + w)
        if self._paired is None or self._paired[0] is not model:
            self._paired = (model, *self._pairs(model))
        _, averaged, current = self._paired
        for avg, new in zip(averaged["copy"], current["copy"]):
            avg.copy_(new)
        for dtype_device, avgs in averaged["lerp"].items():
            # avg * (W / (W + w)) + new * (w / (W + w)), every tensor of one dtype/device in one call
            torch._foreach_lerp_(avgs, current["lerp"][dtype_device], ratio)
        self.total_weight += w
        return w

    def _pairs(self, model: nn.Module):
        """The averaged copy's tensors and the live model's, matched by name, grouped for the fused update.

        Built once: the optimiser updates the live tensors in place, so the same lists stay valid every step.
        """
        live = dict(model.named_parameters())
        live.update(model.named_buffers())
        averaged: dict = {"copy": [], "lerp": {}}
        current: dict = {"copy": [], "lerp": {}}
        for name, avg in [*self.module.named_parameters(), *self.module.named_buffers()]:
            new = live[name]
            if avg.is_floating_point():
                key = (avg.dtype, avg.device)
                averaged["lerp"].setdefault(key, []).append(avg)
                if new.dtype != avg.dtype or new.device != avg.device:
                    raise ValueError(f"{name}: the model holds {new.dtype} on {new.device}, its average {avg.dtype} on {avg.device}")
                current["lerp"].setdefault(key, []).append(new.detach())
            else:
                averaged["copy"].append(avg)
                current["copy"].append(new)
        return averaged, current

    def state_dict(self) -> dict:
        return {
            "module": self.module.state_dict(),
            "step": self.step,
            "total_weight": self.total_weight,
            "total_steps": self.total_steps,
            "beta": self.beta,
        }

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.step = int(state["step"])
        self.total_weight = float(state["total_weight"])
        self.total_steps = int(state["total_steps"])
        self.beta = float(state["beta"])
