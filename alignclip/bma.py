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

    def weight(self, k: int) -> float:
        return beta_pdf((k + 0.5) / (self.total_steps + 1), self.beta, self.beta)

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Fold the current weights in as step ``self.step + 1``; returns that step's weight w_k."""
        self.step += 1
        w = self.weight(self.step)
        ratio = w / (self.total_weight + w)
        current = model.state_dict()
        for name, avg in self.module.state_dict().items():
            new = current[name]
            if avg.is_floating_point():
                avg.lerp_(new.to(avg.dtype), ratio)  # avg * (W / (W + w)) + new * (w / (W + w))
            else:
                avg.copy_(new)
        self.total_weight += w
        return w

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
