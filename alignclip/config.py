"""params.yaml: the one configuration file, read by the CLI's pipeline commands and the KFP pipelines.

Each leaf ``section.key`` maps to the pipeline parameter ``section_key`` (``train.steps`` -> ``train_steps``).
"""

from __future__ import annotations

from pathlib import Path

import yaml

SCHEMA = {
    "data": {"dataset": str, "root": str, "protocol": str, "holdout_fraction": float, "trial_seed": int, "shots": int, "test_split": str},
    "model": {"name": str, "pretrained": str},
    "train": {"recipe": str, "formulation": str, "methods": list, "test_domains": list, "seeds": list,
              "steps": int, "batch_size": int, "lr": float, "hflip": bool,
              "num_workers": str},
}


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the project's parameters file)")
    params = yaml.safe_load(path.read_text()) or {}
    for section, keys in SCHEMA.items():
        if section not in params:
            raise ValueError(f"{path}: missing section {section!r}; expected keys {sorted(keys)}")
        unknown = sorted(set(params[section]) - set(keys))
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown} in {section!r}; expected some of {sorted(keys)}")
        for key, kind in keys.items():
            if key not in params[section]:
                raise ValueError(f"{path}: missing {section}.{key} ({kind.__name__})")
            value = params[section][key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if kind is str and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)  # a count where "auto" is also accepted (train.num_workers: 4)
            if not isinstance(value, kind):
                raise ValueError(f"{path}: {section}.{key}={value!r} should be a {kind.__name__}")
            params[section][key] = value
    return params


def pipeline_defaults(path: str | Path = "params.yaml") -> dict:
    """params.yaml flattened to pipeline parameter names; built-in demo values when the file is absent."""
    params = load_params(path) if Path(path).is_file() else load_params(Path(__file__).parent / "resources" / "params.default.yaml")
    flat = {f"{section}_{key}": value for section, keys in params.items() for key, value in keys.items()}
    return flat
