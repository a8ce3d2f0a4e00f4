"""Building an open_clip CLIP from an architecture name and a weights file (or none): the model factory below the
presets (``alignclip.presets``: names, default weights, where weights come from) and the project's own
pre-training (``alignclip.pretrain``), which builds the tiny preset's weights with it."""

from __future__ import annotations

import logging
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from alignclip.log import get_logger

log = get_logger(__name__)

RESOURCES = Path(__file__).parent / "resources"
RANDOM_INIT_SEED = 0
_TINY_REGISTERED = False


@dataclass
class CLIPBundle:
    """A loaded CLIP model with what the pipeline needs around it."""

    model: torch.nn.Module  # open_clip CLIP: .visual, .encode_text, .encode_image
    tokenizer: Callable
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    architecture: str
    pretrained: str | None
    # the loaded model's pre-trained softmax temperature, 1 / exp(logit_scale): 0.01 for OpenAI's CLIPs (scale 100),
    # about 0.073 for the tiny preset's digits pre-training; eq. 1 and eq. 4 use it unless a method fixes a value
    tau: float


def pretrained_tau(model: torch.nn.Module) -> float:
    """1 / exp(logit_scale) of an open_clip CLIP: the temperature its contrastive pre-training learned."""
    scale = getattr(model, "logit_scale", None)
    if not isinstance(scale, torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no logit_scale: cannot read its pre-trained temperature; "
                         "fix tau with --set tau=VALUE (and aal_tau)")
    return float(1.0 / scale.detach().float().exp().item())


def register_project_configs() -> None:
    """The project's own open_clip model configs (resources/model_configs: the tiny presets), once."""
    global _TINY_REGISTERED
    if not _TINY_REGISTERED:
        import open_clip

        open_clip.add_model_config(RESOURCES / "model_configs")
        _TINY_REGISTERED = True


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def _quiet_random_init(asked: bool):
    """Random weights that were asked for (`pretrained: none`, the pretrain stage) are no cause for open_clip's
    root-logger WARNING; our own INFO line says `weights: random`."""
    if not asked:
        yield
        return
    quiet = _NoRandomInitWarning()
    root = logging.getLogger()  # open_clip calls logging.warning: the record starts (and is filtered) at the root
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def build_clip(architecture: str, weights: str | None, pretrained: str | None, device: str | torch.device = "cpu") -> CLIPBundle:
    """The CLIP ``architecture`` (an open_clip or project config name) with ``weights`` (what open_clip accepts: a
    tag or a local file; None: random, drawn under ``RANDOM_INIT_SEED``); ``pretrained`` is the source as asked,
    recorded in the bundle."""
    import open_clip

    register_project_configs()
    try:
        # Random weights are drawn under a fixed seed (scoped: the caller's RNG is untouched), so every stage
        # (similarity, train, evaluate, report) builds the same model, including its frozen text tower.
        with torch.random.fork_rng(devices=[]), _quiet_random_init(weights is None):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(architecture, pretrained=weights, device=device)
    except (pickle.UnpicklingError, EOFError) as err:
        # open_clip reads checkpoint files with weights_only=True: a pickle with code in it ends here.
        raise ValueError(f"{weights}: refused or unreadable weights file for {architecture} ({str(err).splitlines()[0]})") from None
    except RuntimeError as err:
        if weights is not None and not Path(weights).is_file():
            raise RuntimeError(
                f"could not load pretrained weights {weights!r} for {architecture}: {err}\n"
                "This machine may be offline. Provide the weights without the hub: download the checkpoint "
                "elsewhere and pass its file path (model.pretrained: /path/to/checkpoint.pt), upload it and pass "
                "s3://bucket/key, or pre-fill the Hugging Face cache (HF_HOME) and set HF_HUB_OFFLINE=1."
            ) from err
        raise
    model.eval()
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    tokenizer = open_clip.get_tokenizer(architecture)
    tau = pretrained_tau(model)
    log.info("loaded %s (weights: %s, pre-trained tau %.4g)", architecture, pretrained or "random", tau)
    return CLIPBundle(model, tokenizer, int(size), mean, std, architecture, pretrained, tau)
