"""The one configuration model: every setting of a benchmark run, typed, with its default and help text.

Every runner reads it the same way: `alignclip train` (its options and ``--params-file``), `dvc repro` (``params.yaml``
is this schema rendered for the demo, ``alignclip config show demo``), and `alignclip pipeline compile|submit|run`
(each setting is the KFP pipeline parameter ``section_key``: ``train.steps`` -> ``train_steps``).

Precedence, lowest first: method defaults < recipe < family defaults < params file < explicit CLI option/--param.
``None`` means "not set": the recipe's (lr, batch, schedule, flip), the dataset's (protocol, held-out domains) or the
benchmark's (recipe) value applies. It is never 0.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignclip import protocols
from alignclip.methods import DEFAULT_FORMULATION, FORMULATIONS


class ConfigError(ValueError):
    """A bad setting: the message is the one line the user sees."""


@dataclass(frozen=True)
class Setting:
    key: str  # section.key, as in params.yaml
    type: str  # str | int | float | bool | list[str] | list[int] | grid (method entry -> {key: [values]})
    default: Any
    help: str
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    optional: bool = False  # None ("not set") is a valid value
    kfp_only: bool = False  # a pipeline setting (MLflow of the cluster), not in params.yaml / DVC

    @property
    def name(self) -> str:
        return self.key.replace(".", "_")

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def field(self) -> str:
        return self.key.split(".", 1)[1]


PROTOCOLS = tuple(protocols.PROTOCOLS)  # the registry's names (alignclip/protocols/)
PAPER_METHODS = ["zeroshot", "erm", "clipood", "alignclip"]

SETTINGS: tuple[Setting, ...] = (
    Setting("data.dataset", "str", "rotated_digits", "registry name (`alignclip prepare --help`) or a custom dataset"),
    Setting("data.root", "str", "data/{dataset}", "folder or s3:// prefix with the dataset in its usual layout; {dataset} stands for data.dataset (`embedded`: build RotatedDigits in the pipeline)"),
    Setting("data.protocol", "str", None, "domainbed | wild | base2new | imagenet (not set: the dataset's own)", PROTOCOLS, optional=True),
    Setting("data.holdout_fraction", "float", 0.2, "DomainBed per-domain held-out fraction", minimum=0.01, maximum=0.99),
    Setting("data.trial_seed", "int", 0, "trial seed of the in/out split: DomainBed's (domainbed); wild: 0 is CLIPood's split, others our extension", minimum=0),
    Setting("data.shots", "int", 16, "few-shot images per class (base2new, imagenet)", minimum=1, maximum=100000),
    Setting("data.templates", "str", "paper", "prompt templates: paper (appendix A.2) | release (the released code's: CoOp's CUSTOM_TEMPLATES)", ("paper", "release")),
    Setting("data.class_names", "str", "paper", "class names in prompts: paper ('_' and '-' become spaces) | release (only '_', as the released code)", ("paper", "release")),
    Setting("data.listing", "str", "sorted", "imagenet: image order of the few-shot picks: sorted (the same everywhere) | filesystem (CoOp's os.listdir order)", ("sorted", "filesystem")),
    Setting("data.sample_seeds", "list[int]", None, "few-shot protocols: seeds of the few-shot samples that prepare draws (not set: train.seeds); unused by the others, so a new training seed re-runs no prepare", minimum=0, optional=True),
    Setting("data.test_split", "str", protocols.TEST_SPLITS[0], "held-out domain: holdout = its 20% split (CLIPood) | in = its 80% split (DomainBed) | full", protocols.TEST_SPLITS),
    Setting("model.name", "str", "tiny", "preset (tiny, vit-b-16, vit-b-32, rn50, vit-l-14) or open_clip architecture"),
    Setting("model.pretrained", "str", "default", "preset default, open_clip tag, checkpoint path, s3:// URI, or none"),
    Setting("train.recipe", "str", None, "named recipe (`alignclip recipes`); not set: the benchmark's recipe for the dataset, else `paper`", optional=True),
    Setting("train.formulation", "str", DEFAULT_FORMULATION, "paper | release (the authors' released code)", FORMULATIONS),
    Setting("train.methods", "list[str]", PAPER_METHODS, "methods of the grid; method+formulation overrides train.formulation"),
    Setting("train.test_domains", "list[str]", None, "held-out domains of the grid (not set: every domain of the dataset; [\"\"] where none is held out)", optional=True),
    Setting("train.seeds", "list[int]", [0, 1, 2], "seeds of the grid", minimum=0),
    Setting("train.seed", "int", 0, "seed of one `alignclip train` (--seed): its batches, augmentations and few-shot subset; the grid's cells run train.seeds", minimum=0),
    Setting("train.grid", "grid", {}, "selection grid: method entry of train.methods -> {key: [values]} with key lr, batch_size, steps or a method switch; every combination is a cell, and training-domain validation picks one"),
    Setting("train.steps", "int", None, "optimiser steps (not set: the recipe's)", minimum=1, maximum=10_000_000, optional=True),
    Setting("train.epochs", "int", None, "epochs instead of steps (not set: the recipe's)", minimum=1, maximum=100_000, optional=True),
    Setting("train.batch_size", "int", None, "images per training domain and step (not set: the recipe's)", minimum=1, maximum=4096, optional=True),
    Setting("train.lr", "float", None, "peak learning rate of the cosine schedule (not set: the recipe's)", minimum=1e-12, maximum=1.0, optional=True),
    Setting("train.hflip", "bool", None, "random horizontal flip (not set: the recipe's)", optional=True),
    Setting("train.weight_decay", "float", 0.1, "AdamW weight decay (which parameters: the method switch weight_decay_scope)", minimum=0.0, maximum=10.0),
    Setting("evaluate.batch_size", "int", 512, "images per evaluation batch", minimum=1, maximum=65536),
    Setting("similarity.scale", "float", 1.0, "softmax scale of the class similarity heatmap (paper 1, released code 35)", minimum=1e-6, maximum=1e6),
    Setting("mlflow.tracking_uri", "str", "", "MLflow server of pipeline tasks (empty: no tracking); DVC and the CLI read MLFLOW_TRACKING_URI", kfp_only=True),
    Setting("mlflow.experiment", "str", None, "MLflow experiment of pipeline tasks (not set: the family's)", optional=True, kfp_only=True),
)
BY_NAME = {s.name: s for s in SETTINGS}
BY_KEY = {s.key: s for s in SETTINGS}
@dataclass(frozen=True)
class Family:
    """A benchmark family: a KFP pipeline, an MLflow experiment and the settings that differ from the schema's."""

    experiment: str
    description: str
    defaults: dict = field(default_factory=dict)


PAPER_MODEL = {"model_name": "vit-b-16", "model_pretrained": "openai"}
DATA_BUCKET = "s3://alignclip-data/{dataset}"  # the bucket infra/ creates, one prefix per dataset
FAMILIES: dict[str, Family] = {
    # every held-out image scored (test_split full: ~300 per domain), 3 seeds, a selection grid per method (README)
    "demo": Family("demo-domain-shift", "the embedded demo: tiny preset on RotatedDigits, CPU minutes", {
        "data_protocol": "domainbed", "data_test_split": "full", "train_recipe": "demo",
        "train_methods": PAPER_METHODS + ["alignclip[aal=false]", "alignclip+release"],
        "train_test_domains": ["rotated_0", "rotated_75"], "train_seeds": [0, 1, 2],
        "train_grid": {"erm": {"lr": [0.0003, 0.001]}, "clipood": {"lr": [0.0003, 0.001]},
                       "alignclip": {"lr": [0.0003, 0.001], "aal_weight": [0.3, 1.0]},
                       "alignclip[aal=false]": {"lr": [0.0003, 0.001]}, "alignclip+release": {"lr": [0.0003, 0.001]}}}),
    "domain_shift": Family("domain-shift", "DomainBed leave-one-domain-out (table 1)", {
        **PAPER_MODEL, "data_dataset": "office_home", "data_root": DATA_BUCKET, "data_protocol": "domainbed"}),
    "imagenet": Family("imagenet-variants", "ImageNet 16 shots -> its four variants (table 3)", {
        **PAPER_MODEL, "data_dataset": "imagenet", "data_root": DATA_BUCKET, "data_protocol": "imagenet"}),
    "base2new": Family("base-to-new", "base-to-new generalisation, 16 shots (table 2)", {
        **PAPER_MODEL, "data_dataset": "oxford_pets", "data_root": DATA_BUCKET, "data_protocol": "base2new"}),
    "wild": Family("in-the-wild", "domain shift and unseen classes (table 4)", {
        **PAPER_MODEL, "data_dataset": "office_home", "data_root": DATA_BUCKET, "data_protocol": "wild"}),
    # paper fig. 5: zero-shot, CLIPood and AlignCLIP with other image encoders on Office-Home, domain shift and
    # unseen classes (run together as the `backbones` pipeline below)
    **{
        f"backbones_{model.replace('-', '_')}_{label}": Family("other-backbones", f"fig. 5: {name} on Office-Home, {what}", {
            "model_name": model, "model_pretrained": "openai", "data_dataset": "office_home", "data_root": DATA_BUCKET,
            "data_protocol": protocol, "train_methods": ["zeroshot", "clipood", "alignclip"]})
        for model, name in (("rn50", "CLIP-RN50"), ("vit-b-32", "CLIP ViT-B/32"))
        for protocol, label, what in (("domainbed", "domain_shift", "domain shift"), ("wild", "wild", "unseen classes"))
    },
}


@dataclass(frozen=True)
class Composite:
    """Families run as one pipeline: one sub-pipeline each, with its own defaults."""

    experiment: str
    description: str
    families: tuple[str, ...]
    datasets: dict = field(default_factory=dict)  # family -> the datasets it runs here (absent: the family's own)


# the datasets of the paper's tables: DomainBed (domain shift), the 11 base-to-new datasets, in the wild (table 4)
DOMAINBED_DATASETS = ("pacs", "vlcs", "office_home", "terra_incognita", "domain_net")
BASE2NEW_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "flowers102", "food101", "fgvc_aircraft",
                     "sun397", "dtd", "eurosat", "ucf101")
WILD_DATASETS = ("office_home", "domain_net")

COMPOSITES: dict[str, Composite] = {
    "all": Composite("alignclip", "every benchmark of the paper's tables 1-4", ("domain_shift", "imagenet", "base2new", "wild"),
                     {"domain_shift": DOMAINBED_DATASETS, "base2new": BASE2NEW_DATASETS, "wild": WILD_DATASETS}),
    "backbones": Composite("other-backbones", "fig. 5: CLIP-RN50 and ViT-B/32 on Office-Home, domain shift and unseen classes",
                           tuple(name for name in FAMILIES if name.startswith("backbones_"))),
}

def composite_members(name: str, data_root: str | None = None) -> list[tuple[str, str, dict]]:
    """The sub-pipelines of a composite, in order: (family, dataset, resolved settings). ``data_root``: one prefix
    for all of them, each dataset under it (``s3://bucket/prefix`` -> ``s3://bucket/prefix/<dataset>``); none: each
    family's own root."""
    composite = COMPOSITES[name]
    members = []
    for family in composite.families:
        for dataset in composite.datasets.get(family) or (check_family(family).defaults.get("data_dataset"),):
            overrides = {"data_dataset": dataset} if dataset in composite.datasets.get(family, ()) else {}
            if data_root:
                overrides["data_root"] = data_root.rstrip("/") + "/{dataset}"
            values = resolve(family, None, overrides)
            members.append((family, values["data_dataset"], values))
    return members


# A family's values that hold for its dataset only: not set again when the user chooses another dataset
DATASET_BOUND = ("train_test_domains", "train_recipe", "train_grid")

# The benchmark's recipe for a (protocol, dataset) is the protocol's ``recipe`` pattern when that recipe exists
FALLBACK_RECIPE = "paper"


# -- values ---------------------------------------------------------------------------------------------------------


def lookup(name: str, where: str = "") -> Setting:
    """A setting by pipeline name (``train_steps``) or params.yaml key (``train.steps``)."""
    setting = BY_NAME.get(name) or BY_KEY.get(name)
    if setting is None:
        raise ConfigError(f"{where}unknown setting {name!r}: expected one of {', '.join(BY_NAME)}")
    return setting


# what a type is called in messages, one value and several ("expected an integer", not "expected a int")
KIND_WORDS = {"bool": ("true or false", "true/false values"), "int": ("an integer", "integers"),
              "float": ("a number", "numbers"), "str": ("text", "names")}


def _scalar(setting: Setting, value, kind: str, where: str):
    if kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind == "str":
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}{setting.key}={value!r}: expected {KIND_WORDS[kind][0]}")


def coerce(setting: Setting, value, where: str = ""):
    """A value of the setting's type, checked against its choices and range; strings as typed on a command line.

    Lists accept JSON (``["Art", "Real World"]``) and comma-separated text (``Art,Real World``)."""
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and setting.optional):
        if not setting.optional:
            raise ConfigError(f"{where}{setting.key} must be set ({setting.help})")
        return None
    if setting.type == "grid":
        return _coerce_grid(setting, value, where)
    if setting.type.startswith("list["):
        kind = setting.type[5:-1]
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{where}{setting.key}={value!r}: malformed JSON list ({err.msg})") from None
            else:
                value = [part.strip() for part in text.split(",")] if text else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}{setting.key}={value!r}: expected a list of {KIND_WORDS[kind][1]} (JSON or comma-separated)")
        items = [_scalar(setting, item, kind, where) for item in value]
        if not items:
            raise ConfigError(f"{where}{setting.key} is an empty list; expected one or more {KIND_WORDS[kind][1]}")
        for item in items:
            _check_range(setting, item, where)
        return items
    value = _scalar(setting, value, setting.type, where)
    if setting.choices and value not in setting.choices:
        raise ConfigError(f"{where}{setting.key}={value!r}: expected one of {', '.join(setting.choices)}")
    _check_range(setting, value, where)
    return value


def _coerce_grid(setting: Setting, value, where: str) -> dict:
    """``{entry: {key: [values]}}`` (YAML mapping or JSON text); a single value stands for a list of one. The keys
    are checked against the methods and switches in ``derive``, where train.methods is known."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}{setting.key}={value!r}: malformed JSON mapping ({err.msg})") from None
    expected = f"{setting.key}: expected a mapping of method entry -> {{key: [values]}}, e.g. {{alignclip: {{lr: [0.0003, 0.001]}}}}"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}{expected}; got {value!r}")
    checked = {}
    for entry, axes in value.items():
        if not isinstance(axes, dict) or not axes:
            raise ConfigError(f"{where}{setting.key}.{entry}: {expected.split(': ', 1)[1]}; got {axes!r}")
        checked[str(entry)] = {}
        for key, values in axes.items():
            values = list(values) if isinstance(values, (list, tuple)) else [values]
            if not values or any(isinstance(v, (dict, list)) or v is None for v in values):
                raise ConfigError(f"{where}{setting.key}.{entry}.{key}={values!r}: expected a list of one or more values")
            checked[str(entry)][str(key)] = values
    return checked


def _check_range(setting: Setting, value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if setting.minimum is not None and value < setting.minimum:
        raise ConfigError(f"{where}{setting.key}={value!r}: expected at least {setting.minimum:g}")
    if setting.maximum is not None and value > setting.maximum:
        raise ConfigError(f"{where}{setting.key}={value!r}: expected at most {setting.maximum:g}")


def parse_assignments(items: list[str] | None, where: str = "--param ") -> dict:
    """``KEY=VALUE`` pairs (``train_steps=3`` or ``train.steps=3``) as typed values by pipeline name."""
    values = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{where}{item!r}: expected KEY=VALUE with KEY one of {', '.join(BY_NAME)}")
        key, value = item.split("=", 1)
        setting = lookup(key.strip(), where)
        values[setting.name] = coerce(setting, value, where)
    return values


def load_params_file(path: str | Path) -> dict:
    """The settings a params file sets (any subset of the schema), by pipeline name; errors name the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"params file {path} is a folder; expected a YAML file such as params.yaml")
    if not path.is_file():
        raise ConfigError(f"params file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected sections {sorted({s.section for s in SETTINGS})}, got {type(data).__name__}")
    values = {}
    for section, keys in data.items():
        known = [s.field for s in SETTINGS if s.section == section]
        if not known:
            raise ConfigError(f"{path}: unknown section {section!r}; expected one of {sorted({s.section for s in SETTINGS})}")
        if not isinstance(keys, dict):
            raise ConfigError(f"{path}: section {section!r} should map keys to values; expected keys {known}")
        for key, value in keys.items():
            setting = BY_KEY.get(f"{section}.{key}")
            if setting is None:
                raise ConfigError(f"{path}: unknown key {section}.{key}; expected one of {', '.join(f'{section}.{k}' for k in known)}")
            values[setting.name] = coerce(setting, value, f"{path}: ")
    return values


# -- resolution -----------------------------------------------------------------------------------------------------


def check_family(family: str) -> Family:
    if family not in FAMILIES:
        raise ConfigError(f"unknown pipeline family {family!r}: expected one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


# Precedence, lowest first. A layer is data, {pipeline name: value}; ``None`` in a layer is "not set" and leaves the
# value below it. Below every layer sits the schema's default (DEFAULTS).
#   method       the method's own switch values (alignclip/methods.py, MethodConfig and its registry)
#   recipe       a named recipe's training values and method switches (alignclip/recipes.py, Recipe.layer)
#   family       a benchmark family's defaults (FAMILIES), with its MLflow experiment
#   params_file  a params file (load_params_file)
#   explicit     command-line options, --param, --set, --hparam: a grid cell's own values
PRECEDENCE = ("method", "recipe", "family", "params_file", "explicit")
SWITCHES = "method_switches"  # a layer's method switches {switch: value}, folded switch by switch
# one length: a layer that sets steps drops the epochs (and iterations per epoch) below it, one that sets epochs the
# steps below it (an explicit --steps beats the recipe's epochs, an explicit --epochs its steps)
LENGTH_CLEARS = {"train_steps": ("train_epochs", "train_iters_per_epoch"), "train_epochs": ("train_steps",)}
DEFAULTS = {s.name: s.default for s in SETTINGS}


def fold(layers: dict[str, dict], origins: dict | None = None) -> dict:
    """THE resolver: the schema's defaults, then each layer of ``layers`` ({layer name: {pipeline name: value}}) in
    PRECEDENCE order, the later winning. ``origins`` (optional) is filled with the layer each value came from
    (``method_switches.<switch>`` for a switch)."""
    unknown = sorted(set(layers) - set(PRECEDENCE))
    if unknown:
        raise ValueError(f"unknown settings layer(s) {unknown}: expected some of {', '.join(PRECEDENCE)}")
    values = copy.deepcopy(DEFAULTS)
    values[SWITCHES] = {}
    for layer in PRECEDENCE:
        given = {name: value for name, value in (layers.get(layer) or {}).items() if value is not None}
        for name in given:
            for other in LENGTH_CLEARS.get(name, ()):
                if other not in given:  # steps and epochs of one layer: steps wins (schedule)
                    values[other] = None
        for name, value in given.items():
            if name == SWITCHES:
                values[SWITCHES] = {**values[SWITCHES], **value}
                if origins is not None:
                    origins.update({f"{SWITCHES}.{k}": layer for k in value})
                continue
            values[name] = copy.deepcopy(value)
            if origins is not None:
                origins[name] = layer
    return values


def family_layer(family: str | None) -> dict:
    if family is None:
        return {}
    chosen = check_family(family)
    return {"mlflow_experiment": chosen.experiment, **chosen.defaults}


def typed(values: dict | None, where=lambda setting: "") -> dict:
    """Values by pipeline name or params key, each checked against the schema (``where``: the message's prefix);
    ``None`` (an option not given) stays out."""
    checked = {}
    for name, value in (values or {}).items():
        if value is None:
            continue
        setting = lookup(name)
        checked[setting.name] = coerce(setting, value, where(setting))
    return checked


# the stage options named otherwise than their setting's key (`alignclip prepare --seed` sets data.sample_seeds)
OPTION_NAMES = {"model_name": "--model", "data_sample_seeds": "--seed"}


def option_name(setting: Setting) -> str:
    """``--batch-size: `` for train.batch_size: a command-line value's messages name its option."""
    return OPTION_NAMES.get(setting.name, f"--{setting.field.replace('_', '-')}") + ": "


def resolve(family: str | None = None, params_file: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Every setting by pipeline name: the fold of family < params file < overrides, then the derived values
    (protocol, recipe, held-out domains) filled in and the whole checked. No work has started when it fails.
    The recipe's training values stay not set (None) here: ``effective_train`` folds them in under these."""
    layers = {"family": family_layer(family), "params_file": load_params_file(params_file) if params_file is not None else {},
              "explicit": typed(overrides)}
    if family is not None and fold(layers)["data_dataset"] != FAMILIES[family].defaults.get("data_dataset", DEFAULTS["data_dataset"]):
        # the family chose these for its own dataset (demo: two of RotatedDigits' domains and its recipe); another
        # dataset brings its own (derive) unless the user set them. data.root follows through its {dataset}.
        layers["family"] = {k: v for k, v in layers["family"].items() if k not in DATASET_BOUND}
    values = fold(layers)
    del values[SWITCHES]  # a configuration's switches are its method entries' (train.methods, train.grid)
    return derive(values)


def resolve_stage(params_file: str | Path | None = None, explicit: dict | None = None) -> dict:
    """The settings of one stage command (prepare, train, similarity, evaluate, report): the fold of params file <
    explicit options, no family and no derived grid (a stage runs one cell). An option's bad value names the option."""
    layers = {"params_file": load_params_file(params_file) if params_file is not None else {},
              "explicit": typed(explicit, option_name)}
    values = fold(layers)
    del values[SWITCHES]
    return values


def dataset_spec(name: str):
    from alignclip.data.registry import DATASETS

    return DATASETS.get(name)


def default_protocol(dataset: str) -> str:
    from alignclip.data.registry import default_protocol as of_dataset

    return of_dataset(dataset)


def default_recipe(protocol: str, dataset: str) -> str:
    from alignclip.recipes import RECIPES

    name = protocols.get_protocol(protocol).recipe.format(dataset=dataset)
    return name if name in RECIPES else FALLBACK_RECIPE


def check_grid(values: dict) -> None:
    """train.methods' entries (methods, formulations, switches) and train.grid's keys and values."""
    from alignclip.methods import FORMULATIONS, METHODS, split_method

    for method in values["train_methods"]:
        base, switches = parse_entry(method, "train.methods: ")
        name, formulation = split_method(base, values["train_formulation"])
        if name not in METHODS or formulation not in FORMULATIONS:
            raise ConfigError(f"train.methods: unknown method {method!r}; expected one of {', '.join(METHODS)}, "
                              f"optionally with +{' or +'.join(FORMULATIONS)} and [switch=value,...]")
        typed_grid_values(switches, f"train.methods: {method}: ")
    if len(set(values["train_methods"])) != len(values["train_methods"]):
        raise ConfigError(f"train.methods={values['train_methods']}: an entry is listed twice")
    for entry, axes in (values.get("train_grid") or {}).items():
        if entry not in values["train_methods"]:
            raise ConfigError(f"train.grid: {entry!r} is not an entry of train.methods ({', '.join(values['train_methods'])})")
        if is_zeroshot(entry):
            raise ConfigError(f"train.grid: {entry!r} trains nothing, so it has no settings to select")
        for key, options in axes.items():
            for option in options:
                typed_grid_values({key: option}, f"train.grid.{entry}: ")


def derive(values: dict) -> dict:
    """The values that follow from the others (root, protocol, recipe, held-out domains, few-shot seeds), the whole
    checked."""
    from alignclip.recipes import RECIPES

    values = dict(values)
    dataset = values["data_dataset"]
    values["data_root"] = values["data_root"].replace("{dataset}", dataset)
    if values["data_protocol"] is None:
        values["data_protocol"] = default_protocol(dataset)
    protocol = values["data_protocol"]
    if values["train_recipe"] is None:
        values["train_recipe"] = default_recipe(protocol, dataset)
    if values["train_recipe"] not in RECIPES:
        raise ConfigError(f"train.recipe={values['train_recipe']!r}: unknown recipe; expected one of {', '.join(RECIPES)}")
    check_grid(values)
    spec = dataset_spec(dataset)
    # before the domains: a dataset of another protocol lists none, and that is not what is wrong
    allowed = [name for name, p in protocols.PROTOCOLS.items() if spec is not None and spec.protocol in p.layouts]
    if spec is not None and protocol not in allowed:
        families = [name for name, f in FAMILIES.items() if "data_dataset" in f.defaults and not name.startswith("backbones_")
                    and f.defaults.get("data_protocol") in allowed]
        raise ConfigError(f"data.protocol={protocol!r}: dataset {dataset!r} supports {' or '.join(allowed)}, not {protocol} "
                          f"(family {' or '.join(families)})")
    if protocols.get_protocol(protocol).held_out_domain:
        known = list(spec.domains) if spec is not None else []
        if values["train_test_domains"] is None:
            if spec is None:
                # a dataset of one's own works when its held-out domains are named; otherwise it is most likely a typo
                from alignclip.data.registry import DATASETS

                raise ConfigError(f"unknown dataset {dataset!r}: expected one of {', '.join(sorted(DATASETS))}; for a dataset "
                                  "of your own, set train.test_domains (and data.root)")
            if not known:
                raise ConfigError(f"train.test_domains is not set and dataset {dataset!r} lists no domains; set it")
            values["train_test_domains"] = known
        elif known:
            unknown = [d for d in values["train_test_domains"] if d not in known]
            if unknown:
                raise ConfigError(f"train.test_domains: {dataset} has no domain {unknown[0]!r}; expected some of {known}")
    else:
        if values["train_test_domains"] not in (None, [""]):
            raise ConfigError(f"train.test_domains={values['train_test_domains']}: the {protocol} protocol holds out no domain; leave it unset")
        values["train_test_domains"] = [""]  # one cell per (method, seed); DVC's matrix needs a list
        # few-shot: prepare draws a sample per seed; a params file states them (DVC's prepare depends on them alone)
        if values.get("data_sample_seeds") is None:
            values["data_sample_seeds"] = list(values["train_seeds"])
        missing = [s for s in values["train_seeds"] if s not in values["data_sample_seeds"]]
        if missing:
            raise ConfigError(f"data.sample_seeds={values['data_sample_seeds']} lacks train.seeds {missing}: prepare draws "
                              "the few-shot samples of data.sample_seeds only; add them")
    return values


# -- the grid: method entries, their selection grids, cells -------------------------------------------------------

# what a selection grid (train.grid) may vary besides method switches: the training settings of one cell
GRID_TRAIN_KEYS = {"lr": "train_lr", "batch_size": "train_batch_size", "steps": "train_steps"}
ENTRY = re.compile(r"^(?P<method>[A-Za-z_]+(?:[+@][A-Za-z_]+)?)(?:\[(?P<switches>[^\[\]]*)\])?$")


def _grid_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def typed_grid_values(switches: dict, where: str = "") -> tuple[dict, dict]:
    """``{key: value}`` of an entry's brackets or a grid cell split into (method switches, training settings by
    pipeline name), each typed (``aal=flase`` or ``lr=abc`` fails here, naming the key)."""
    train = {GRID_TRAIN_KEYS[k]: coerce(BY_NAME[GRID_TRAIN_KEYS[k]], v, where) for k, v in switches.items() if k in GRID_TRAIN_KEYS}
    try:
        method = check_method_switches({k: v for k, v in switches.items() if k not in GRID_TRAIN_KEYS})
    except ConfigError as err:
        raise ConfigError(f"{where}{str(err).removeprefix('--set ')} (or one of {', '.join(GRID_TRAIN_KEYS)})") from None
    return method, train


def parse_entry(entry: str, where: str = "") -> tuple[str, dict]:
    """A method entry of train.methods (or a cell name): ``alignclip``, ``alignclip+release``, ``alignclip[aal=false]``,
    ``alignclip[aal_weight=0.5,lr=0.001]`` -> (``alignclip+release``-style method, {key: value}) with the bracket's
    values parsed (numbers, true/false) but not yet typed (``typed_grid_values``)."""
    match = ENTRY.match(entry.strip())
    if match is None:
        raise ConfigError(f"{where}method {entry!r}: expected METHOD, METHOD+FORMULATION or METHOD[key=value,...]")
    switches = {}
    for item in filter(None, (part.strip() for part in (match["switches"] or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where}method {entry!r}: {item!r} is not key=value")
        switches[key.strip()] = _grid_value(value.strip())
    return match["method"], switches


def _format_grid_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def cell_name(entry: str, hparams: dict) -> str:
    """The entry with the cell's varied settings in its brackets: ``alignclip[aal=false,lr=0.001]``. Names the cell's
    output folder and DVC/KFP labels; the variant label (the report's row) leaves the varied settings out."""
    method, switches = parse_entry(entry)
    merged = {**switches, **hparams}
    if not merged:
        return method
    return method + "[" + ",".join(f"{k}={_format_grid_value(v)}" for k, v in sorted(merged.items())) + "]"


def entry_hparams(values: dict, entry: str) -> list[dict]:
    """The selection grid of one method entry, every combination of its keys' values (keys sorted); ``[{}]``
    without a grid, and for zero-shot, which trains nothing."""
    from alignclip.methods import split_method

    axes = (values.get("train_grid") or {}).get(entry)
    if not axes or split_method(parse_entry(entry)[0])[0] == "zeroshot":
        return [{}]
    keys = sorted(axes)
    return [dict(zip(keys, combination)) for combination in itertools.product(*(axes[k] for k in keys))]


def is_zeroshot(entry: str) -> bool:
    from alignclip.methods import split_method

    return split_method(parse_entry(entry)[0])[0] == "zeroshot"


def cell_dir(cell: dict) -> str:
    """A cell's output folder: ``<cell name>-<held-out domain>-s<seed>``; zero-shot, run once per domain, has no seed."""
    domain = cell["test_domain"] or "all"
    return f"{cell['name']}-{domain}" if cell.get("seed") is None else f"{cell['name']}-{domain}-s{int(cell['seed'])}"


def grid(values: dict) -> list[dict]:
    """The cells of a resolved configuration: (method entry, held-out domain, seed, varied settings), "" when no
    domain is held out. Each cell: ``method`` (the entry), ``test_domain``, ``seed``, ``hparams`` (the selection
    grid's values of this cell, {} without one) and ``name`` (``cell_name``). Zero-shot is deterministic and trains
    nothing: one cell per held-out domain and no ``seed`` key (KFP's items hold no nulls); the report reuses it for
    every seed.

    Where the recipe's length differs per held-out domain (``wild/domain_net``) and no length is set, each cell
    carries its own ``steps``."""
    from alignclip.recipes import get_recipe

    domains = values["train_test_domains"] or [""]
    cells = []
    for d in domains:
        for m in values["train_methods"]:
            if is_zeroshot(m):
                cells.append({"method": m, "test_domain": d, "hparams": {}, "name": cell_name(m, {})})  # no seed
                continue
            for hparams in entry_hparams(values, m):
                cells += [{"method": m, "test_domain": d, "seed": int(s), "hparams": hparams, "name": cell_name(m, hparams)}
                          for s in values["train_seeds"]]
    if values["train_steps"] is None and values["train_epochs"] is None and get_recipe(values["train_recipe"]).epochs_by_domain:
        for cell in cells:
            if "steps" not in cell["hparams"]:
                cell["steps"] = int(effective_train(values, cell["test_domain"] or None)["steps"])
    return cells


def recipe_layer(name: str | None, test_domain: str | None = None) -> dict:
    from alignclip.recipes import get_recipe

    return get_recipe(name).layer(test_domain) if name else {}


def schedule(folded: dict) -> dict:
    """The training length and values of folded settings: steps whenever they are known before the data is (steps,
    or epochs x iterations per epoch); else ``epochs`` passes over the training set. ``None`` is "not set", never 0."""
    steps, epochs, iters = folded["train_steps"], folded["train_epochs"], folded.get("train_iters_per_epoch")
    if not steps and epochs and iters:
        steps = epochs * iters
    if steps:
        epochs = iters = None
    return {"recipe": folded["train_recipe"], "lr": folded["train_lr"], "batch_size": folded["train_batch_size"],
            "steps": steps, "epochs": epochs, "iters_per_epoch": iters, "hflip": folded["train_hflip"],
            "method_switches": dict(folded[SWITCHES]), "shots": folded.get("train_shots")}


def effective_train(values: dict, test_domain: str | None = None) -> dict:
    """What a grid cell trains with: the recipe layer folded under the resolved values. ``values`` (``resolve``) are
    already the fold of family < params file < explicit, so they stand at the family layer, the lowest of those;
    ``test_domain``: the cell's held-out domain, for recipes whose length depends on it."""
    layers = {"recipe": recipe_layer(values["train_recipe"], test_domain), "family": {n: values.get(n) for n in TRAIN_NAMES}}
    return schedule(fold(layers))


def train_fields(values: dict, test_domain: str | None = None, switches: dict | None = None, method: str | None = None) -> dict:
    """The settings fields of one training (alignclip/train.py's TrainSettings) from resolved values (``resolve`` or
    ``resolve_train``): method < recipe < those values < explicit method switches (--set, the entry's brackets, a
    grid cell's). ``overrides`` are the switches some layer above the method's own set; the method applies them."""
    from alignclip.methods import switch_values

    if not values.get("train_recipe"):
        raise ValueError("train.recipe is not resolved: resolve the settings first (resolve, resolve_train)")
    layers = {"recipe": recipe_layer(values["train_recipe"], test_domain),
              "family": {n: values.get(n) for n in (*TRAIN_NAMES, "train_seed")}, "explicit": {SWITCHES: switches or {}}}
    if method is not None:
        layers["method"] = {SWITCHES: switch_values(method, values["train_formulation"])}
    origins: dict = {}
    folded = fold(layers, origins)
    length = schedule(folded)
    return {
        "formulation": folded["train_formulation"], "model": folded["model_name"], "pretrained": folded["model_pretrained"],
        "seed": folded["train_seed"], "weight_decay": folded["train_weight_decay"], "recipe": length["recipe"],
        "steps": length["steps"], "epochs": length["epochs"], "iters_per_epoch": length["iters_per_epoch"],
        "shots": length["shots"], "batch_size": length["batch_size"], "lr": length["lr"], "hflip": length["hflip"],
        "overrides": {k: v for k, v in folded[SWITCHES].items() if origins[f"{SWITCHES}.{k}"] != "method"},
    }


TRAIN_NAMES = ("model_name", "model_pretrained", "train_recipe", "train_formulation", "train_steps", "train_epochs",
               "train_batch_size", "train_lr", "train_hflip", "train_weight_decay")
# what `alignclip train --params-file` reads (a DVC train stage's `params:` list): not the grid's lists, so adding a
# seed, a method or a domain adds stages and re-runs nothing else
TRAIN_KEYS = tuple(BY_NAME[n].key for n in TRAIN_NAMES) + ("data.dataset", "data.protocol")
# what `alignclip grid --part trained` of one (held-out domain, seed) reads (dvc.yaml's train stage): the training
# settings, the group's cells (methods x selection grid) and the evaluation split; not the seeds or domains
GRID_KEYS = TRAIN_KEYS + ("data.test_split", "train.methods", "train.grid", "evaluate.batch_size")
# what a zero-shot cell reads (dvc.yaml's zeroshot stage): no training setting, so none of them re-runs it
ZEROSHOT_KEYS = ("model.name", "model.pretrained", "data.dataset", "data.protocol", "data.test_split", "train.formulation",
                 "evaluate.batch_size")
# what `alignclip similarity` reads (dvc.yaml's similarity stage)
SIMILARITY_KEYS = ("model.name", "model.pretrained", "similarity.scale")


def resolve_train(params_file: str | Path | None = None, explicit: dict | None = None, meta: dict | None = None) -> dict:
    """The settings of one `alignclip train` by pipeline name (``resolve_stage``). A recipe that is not set is the
    benchmark's for the trained data (``meta``: the prepared dataset's meta.json), else for the params file's dataset,
    else ``paper``."""
    values = resolve_stage(params_file, explicit)
    if values["train_recipe"] is None:
        source = meta or {"dataset": values["data_dataset"], "protocol": values["data_protocol"]}
        protocol = source.get("protocol") or default_protocol(source["dataset"])
        values["train_recipe"] = default_recipe(protocol, source["dataset"])
    return values


# -- checks of single command-line values ---------------------------------------------------------------------------


def check_template(template: str | None) -> str | None:
    """A prompt template has exactly one empty field ``{}`` for the class name and nothing else to fill."""
    if template is None:
        return None
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ConfigError(f"--template {template!r}: {err}; expected text with one {{}} for the class name") from None
    if fields != [""]:
        raise ConfigError(f"--template {template!r}: expected exactly one {{}} (the class name) and no other fields, got {len(fields)} field(s) {fields}")
    return template


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Fail before any work when a result could not be written: the path is a file, or not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file; expected a folder (or a path that does not exist yet)")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{what} {path}: {probe} is a file, so the folder cannot be created")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {probe} is not writable")
    return path


def check_method_switches(overrides: dict) -> dict:
    """``--set key=value`` switches typed by MethodConfig's fields (``methods.check_switches``, the one check)."""
    from alignclip.methods import check_switches

    try:
        return check_switches(overrides)
    except ValueError as err:
        raise ConfigError(f"--set {err}") from None


# -- params.yaml ----------------------------------------------------------------------------------------------------


def render_params(values: dict) -> str:
    """A complete params file of resolved settings, with each setting's help as a comment (``config show``)."""
    lines = ["# alignclip settings, rendered from the schema in alignclip/config.py by `alignclip config show [FAMILY]`",
             "# (params.yaml: `alignclip config show demo > params.yaml`). `dvc repro` reads it; `alignclip pipeline ...",
             "# --params-file` and every stage's `--params-file` (prepare, similarity, train, evaluate, report) take it (or any",
             "# subset of it) too; an option given on the command line beats it.",
             "# null = not set: the recipe's value (train.*), the dataset's (data.protocol, train.test_domains)."]
    section = None
    for setting in SETTINGS:
        if setting.kfp_only:
            continue
        if setting.section != section:
            section = setting.section
            lines.append(f"{section}:")
        value = values.get(setting.name, setting.default)
        text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).split("\n")[0]
        lines.append(f"  {setting.field}: {text}  # {setting.help}")
    return "\n".join(lines) + "\n"
