"""One registry of methods and their switches (DomainBed style): every knob of the paper's ablations and of the
authors' released formulation is a field here, and a method is a named set of values for them.

``formulation: paper`` (default) follows the paper's text (eq. 2-9, A.1); ``formulation: release`` sets the
values that the authors' released training code uses. Each of those values is also an individual switch, so an
ablation can walk from one formulation to the other one step at a time (see docs/fidelity.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

METHODS = ("zeroshot", "erm", "clipood", "alignclip")


@dataclass(frozen=True)
class MethodConfig:
    name: str = "alignclip"
    trains: bool = True  # zeroshot does not train
    # classification term
    classifier: str = "cosine"  # cosine: eq. 1 | margin: CLIPood's margin metric softmax
    margin_alpha: float = 0.3  # CLIPood lambda / released alpha
    smoothing: str = "none"  # none: plain CE | ls: label smoothing (eq. 7) | sls: semantic (eq. 8-9) | sls_release
    eps: float = 0.1  # smoothing factor epsilon
    sls_scale: float = 1.0  # similarity matrix = row-softmax(scale * cos); paper 1, released 35
    sls_weight: float = 1.0  # lambda in L = L_AAL + lambda * L_SLS
    # attention alignment loss
    aal: bool = False
    aal_weight: float = 1.0  # weight of L_AAL (released: 10)
    attn_term: bool = True  # AL of fig. 3b: align class-token attention with G_DV
    sim_term: bool = True  # AS of fig. 3b: align token/text similarity G with G_DV
    aligned_layers: int = 4  # first blocks whose class-token attention is aligned (released: 5)
    dv_layers: int | None = None  # last blocks of the D-V path (default: half the depth)
    branch: str = "dv"  # dv: identity attention | vvv: CLIP Surgery's V-V-V (table 10)
    cls_attn_norm: str = "visual_softmax"  # visual_softmax: eq. 3 | drop_renorm: released (full softmax, drop cls, L1)
    kl_direction: str = "forward"  # forward: KL(A || G_DV), eq. 6 | reverse: KL(G_DV || A), released
    # temperature of G and G_DV (eq. 4): "model" (the loaded CLIP's pre-trained tau, the paper's one symbol tau),
    # a number, or None (no temperature: the released code)
    aal_tau: float | str | None = "model"
    sim_classes: str = "target"  # target: G for T_y only (eq. 4) | all: every class (released term 2)
    # model
    pooling: str = "cls"  # cls: class token | avg: average of visual tokens (table 9)
    # eq. 1's temperature: "model" = 1 / exp(logit_scale) of the loaded CLIP ("retained at its pre-trained
    # setting", A.1: 0.01 for OpenAI's weights), or a number (a fixed-value ablation: tau=0.01)
    tau: float | str = "model"
    # weight averaging
    bma: bool = False
    bma_beta: float = 0.5
    # optimiser: AdamW's weight decay on every encoder parameter (released: AdamW(visual.parameters(), wd)) or
    # on weight matrices only (ours: biases, norms and embeddings exempt; the paper names no decay at all)
    weight_decay_scope: str = "matrices"

    def validate(self) -> "MethodConfig":
        choices = {
            "classifier": ("cosine", "margin"),
            "smoothing": ("none", "ls", "sls", "sls_release"),
            "branch": ("dv", "vvv"),
            "cls_attn_norm": ("visual_softmax", "drop_renorm"),
            "kl_direction": ("forward", "reverse"),
            "sim_classes": ("target", "all"),
            "pooling": ("cls", "avg"),
            "weight_decay_scope": ("matrices", "all"),
        }
        for field, allowed in choices.items():
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"method {self.name!r}: {field}={value!r}, expected one of {allowed}")
        if not 0.0 <= self.eps <= 1.0:
            raise ValueError(f"method {self.name!r}: eps={self.eps}, expected 0..1")
        for field in TEMPERATURES:
            value = getattr(self, field)
            if parse_temperature(field, value) != value:
                raise ValueError(f"method {self.name!r}: {field}={value!r}, expected {_TEMPERATURE_TEXT[field]}")
        return self

    def for_model(self, model_tau: float) -> "MethodConfig":
        """The method with every ``model`` temperature replaced by the loaded CLIP's pre-trained tau
        (``presets.CLIPBundle.tau``): what training runs with and what the checkpoint, train.json, MLflow and
        evaluation record."""
        model_tau = parse_temperature("model tau", model_tau)
        if model_tau == MODEL_TAU:
            raise ValueError("the model's pre-trained tau must be a number")
        return replace(self, **{f: model_tau for f in TEMPERATURES if getattr(self, f) == MODEL_TAU})

    def to_dict(self) -> dict:
        return asdict(self)


MODEL_TAU = "model"  # a temperature switch's value meaning: the loaded CLIP's own, 1 / exp(logit_scale)
TEMPERATURES = ("tau", "aal_tau")
_TEMPERATURE_TEXT = {
    "tau": "'model' (the loaded CLIP's pre-trained temperature) or a positive number",
    "aal_tau": "'model' (the loaded CLIP's pre-trained temperature), a positive number, or none (no temperature)",
}


def parse_temperature(field: str, value):
    """A temperature switch's value from code, params or ``--set``: ``model``, a positive number (or its text), or
    for ``aal_tau`` also none/null (no temperature). Anything else is a ValueError naming the switch."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if field == "aal_tau":
            return None
        raise ValueError(f"{field}={value!r}: expected {_TEMPERATURE_TEXT.get(field, 'a positive number')}")
    number = value
    if isinstance(value, str):
        if value.strip().lower() == MODEL_TAU:
            return MODEL_TAU
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number <= 0:
        raise ValueError(f"{field}={value!r}: expected {_TEMPERATURE_TEXT.get(field, 'a positive number')}")
    return float(number)


PAPER = {
    "zeroshot": MethodConfig(name="zeroshot", trains=False),
    "erm": MethodConfig(name="erm"),
    "clipood": MethodConfig(name="clipood", classifier="margin", margin_alpha=0.3, bma=True),
    "alignclip": MethodConfig(name="alignclip", smoothing="sls", aal=True, bma=True),
}

# What the released (CLIPood-based) training code computes instead; see docs/fidelity.md, row by row.
RELEASE_OVERRIDES = {
    "classifier": "margin",
    "margin_alpha": 0.3,
    "smoothing": "sls_release",
    "sls_scale": 35.0,
    "sls_weight": 1.0,
    "aal_weight": 10.0,
    "aligned_layers": 5,
    "cls_attn_norm": "drop_renorm",
    "kl_direction": "reverse",
    "aal_tau": None,
    "sim_classes": "all",
    "weight_decay_scope": "all",
}

FORMULATIONS = ("paper", "release")
DEFAULT_FORMULATION = FORMULATIONS[0]  # the paper's text; the schema's train.formulation (alignclip/config.py)


def split_method(name: str, formulation: str = DEFAULT_FORMULATION) -> tuple[str, str]:
    """``alignclip+release`` -> (``alignclip``, ``release``): a grid can hold both formulations side by side.

    ``+`` because DVC reserves ``@`` in stage names; ``alignclip@release`` is accepted too on the command line.
    """
    for separator in ("+", "@"):
        if separator in name:
            name, formulation = name.split(separator, 1)
    return name, formulation


def get_method(name: str, formulation: str = DEFAULT_FORMULATION, **overrides) -> MethodConfig:
    """The named method under a formulation, with individual switches overridden (ablations).

    ``name`` may carry its formulation: ``alignclip+release``.
    """
    name, formulation = split_method(name, formulation)
    if name not in PAPER:
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}")
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}: expected one of {FORMULATIONS}")
    config = PAPER[name]
    if formulation == "release" and name == "alignclip":
        config = replace(config, **RELEASE_OVERRIDES)
    return replace(config, **check_switches(overrides)).validate()


DEFAULT_METHOD = "alignclip"  # what `alignclip train` trains unless --method says otherwise
NOT_SWITCHES = ("name", "trains")  # MethodConfig fields that name a method rather than switch a part of it


def switch_values(name: str, formulation: str = DEFAULT_FORMULATION) -> dict:
    """The method's own switch values: the lowest layer of the settings' precedence (alignclip/config.py)."""
    return {k: v for k, v in get_method(name, formulation).to_dict().items() if k not in NOT_SWITCHES}


def check_switches(overrides: dict) -> dict:
    """Switch values typed by MethodConfig's fields, the one check of a switch's type wherever it is set (--set, a
    method entry's brackets, a grid cell's, a recipe's): ``aligned_layers=abc`` fails here, not mid-run. Choices and
    ranges are ``MethodConfig.validate``'s. A ValueError names the switch and what was expected."""
    kinds = {f.name: str(f.type).replace(" ", "") for f in fields(MethodConfig) if f.name not in NOT_SWITCHES}
    checked = {}
    for key, value in overrides.items():
        if key not in kinds:
            raise ValueError(f"{key}: unknown method switch; expected one of {', '.join(sorted(kinds))}")
        kind = kinds[key]
        if key in TEMPERATURES:  # `model` (the loaded CLIP's own), a number, or (aal_tau) none
            checked[key] = parse_temperature(key, value)
        elif value is None and "None" in kind:
            checked[key] = None
        elif kind.startswith("bool"):
            if not isinstance(value, bool):
                raise ValueError(f"{key}={value!r}: expected true or false")
            checked[key] = value
        elif kind.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key}={value!r}: expected an integer")
            if value < 0:
                raise ValueError(f"{key}={value!r}: expected 0 or more")
            checked[key] = value
        elif kind.startswith("float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key}={value!r}: expected a number")
            checked[key] = float(value)
        else:
            if not isinstance(value, str):
                raise ValueError(f"{key}={value!r}: expected text")
            checked[key] = value
    return checked


def variant_label(method: MethodConfig, formulation: str = DEFAULT_FORMULATION, recipe: str | None = None,
                  hparams: dict | None = None) -> str:
    """``alignclip``, ``alignclip+release``, or with the switches that differ from the method's (and ``recipe``'s)
    defaults: ``erm[pooling=avg]``. Reports label rows with it, so ablations do not mix with the method. The
    switches a selection grid varied (``hparams``) are not an ablation: the selected cell stands for the method."""
    from alignclip.recipes import get_recipe

    base = get_method(method.name, formulation, **(get_recipe(recipe).method if recipe else {})).to_dict()
    changed = {k: v for k, v in method.to_dict().items() if base.get(k) != v and k not in (hparams or {})}
    label = method.name if formulation == "paper" else f"{method.name}+{formulation}"
    if changed:
        label += "[" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())) + "]"
    return label
