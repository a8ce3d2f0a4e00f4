"""One settings model, one resolver: each default is written once (the schema, alignclip/config.py; recipes are
data), and the documented precedence method < recipe < family < params file < explicit is the resolver's, so any
other order of its layers fails the checks below."""

import ast
import itertools
from pathlib import Path

import pytest

from alignclip import config

PACKAGE = Path(config.__file__).resolve().parent

# -- each default once ----------------------------------------------------------------------------------------------

# the name a setting goes by in code, where it is not its field's (model.name is `model` in TrainSettings and options)
CODE_NAMES = {"model.name": "model"}
# settings whose default is not set (None) in the schema: their value is the recipe's, so a literal default of them
# anywhere but in a recipe (alignclip/recipes.py, data) is a second definition
RECIPE_VALUES = ("lr", "batch_size", "steps", "epochs", "hflip")
# the same name for another thing, each with why it is not a copy of the setting
OTHER_THINGS = {
    ("pretrain.py", "weight_decay"): "the tiny preset's own contrastive pre-training, not a fine-tuning run",
    ("pretrain.py", "lr"): "the tiny preset's own contrastive pre-training, not a fine-tuning run",
    ("pretrain.py", "batch_size"): "the tiny preset's own contrastive pre-training, not a fine-tuning run",
    ("pretrain.py", "steps"): "the tiny preset's own contrastive pre-training, not a fine-tuning run",
    ("pretrain.py", "seed"): "the tiny preset's own contrastive pre-training, not a fine-tuning run",
    ("pretrain.py", "pretrained"): "the tiny preset's pre-training starts from random weights, an argument",
    ("train.py", "steps"): "a run's step counter and a zero-shot record's 0 steps, no training length",
    ("train.py", "weight_decay"): "the exempt parameters' group (biases, norms, embeddings) decays by 0",
    ("data/images.py", "hflip"): "the transform's own switch; a run passes its resolved hflip",
    ("similarity.py", "scale"): "the SLS targets' softmax scale, the method switch sls_scale a run passes",
}


def _names() -> set[str]:
    names = {CODE_NAMES.get(s.key, s.field) for s in config.SETTINGS if s.default is not None and not isinstance(s.default, (list, dict))}
    return (names | set(RECIPE_VALUES)) - {"name", "root", "dataset"}  # too generic: a file's, a preset's, a registry's


def _literal(node) -> bool:
    """A written-out value (5e-6, "holdout", True), or typer.Option(<value>, ...): a default of its own."""
    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "Option" and node.args:
        node = node.args[0]
    if isinstance(node, ast.UnaryOp):
        node = node.operand
    return isinstance(node, ast.Constant) and node.value is not None and node.value is not Ellipsis


def second_definitions(package: Path = PACKAGE) -> list[str]:
    """``file:line name=value`` for every default of a setting written outside the schema: a parameter default, a
    class attribute (a dataclass field), a ``name=value`` keyword or a ``"name": value`` entry with a literal value.
    The schema (config.py) and the recipes' data (recipes.py) are the places they belong."""
    names, found = _names(), []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        if relative in ("config.py", "recipes.py"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        pairs = []  # (name, value node, line)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                args = node.args
                positional = args.posonlyargs + args.args
                pairs += [(a.arg, d, d.lineno) for a, d in zip(positional[len(positional) - len(args.defaults):], args.defaults)]
                pairs += [(a.arg, d, d.lineno) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value is not None:
                        pairs.append((item.target.id, item.value, item.lineno))
            elif isinstance(node, ast.Call):
                pairs += [(k.arg, k.value, k.value.lineno) for k in node.keywords if k.arg]
            elif isinstance(node, ast.Dict):
                pairs += [(k.value, v, v.lineno) for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and isinstance(k.value, str)]
        for name, value, line in pairs:
            if name in names and _literal(value) and (relative, name) not in OTHER_THINGS:
                found.append(f"alignclip/{relative}:{line} {name}={ast.unparse(value)}")
    return found


def test_each_default_is_written_once_in_the_schema():
    assert second_definitions() == [], "a setting's default written outside alignclip/config.py (or a recipe)"


def test_the_walk_finds_a_second_definition(tmp_path):
    # the check itself can fail: a module that writes the learning rate and evaluation batch of its own
    (tmp_path / "loop.py").write_text("def run(lr=5e-6, *, batch_size=512):\n    return {'weight_decay': 0.1}\n")
    (tmp_path / "settings.py").write_text("class S:\n    test_split: str = 'holdout'\n    hflip: bool = True\n")
    assert sorted(second_definitions(tmp_path)) == sorted([
        "alignclip/loop.py:1 lr=5e-06", "alignclip/loop.py:1 batch_size=512", "alignclip/loop.py:2 weight_decay=0.1",
        "alignclip/settings.py:2 test_split='holdout'", "alignclip/settings.py:3 hflip=True"])


def test_no_setting_outside_the_schema_is_read_by_a_stage():
    for key in ("train.weight_decay", "train.seed", "evaluate.batch_size", "similarity.scale"):
        assert key in config.BY_KEY, key


# -- one precedence ---------------------------------------------------------------------------------------------------


def check_precedence(tmp_path: Path) -> None:
    """Each pair of neighbouring layers, each layer setting the same value, through the production resolvers."""
    from alignclip.train import TrainSettings, apply_recipe

    # method < recipe: wild/office_home's --alpha 0.1 beats CLIPood's own margin 0.3 (the recorded switches)
    fields = config.train_fields(config.resolve("wild"), method="clipood")
    assert fields["overrides"].get("margin_alpha") == 0.1, fields["overrides"]
    assert apply_recipe(TrainSettings(method="clipood"), "wild/office_home").overrides.get("margin_alpha") == 0.1
    # recipe < family (and what sits above it): a params file's lr beats domain_shift/office_home's 1e-5
    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  lr: 2.0e-5\n  recipe: paper\n  steps: 300\n")
    assert config.effective_train(config.resolve("domain_shift", mine))["lr"] == 2e-5
    # family < params file: the demo family's recipe yields to the file's
    assert config.resolve("demo", mine)["train_recipe"] == "paper"
    # params file < explicit: --param/--steps beat the file
    assert config.resolve("demo", mine, {"train_steps": 7})["train_steps"] == 7
    assert config.resolve_train(mine, {"train_steps": 7})["train_steps"] == 7


def test_the_documented_precedence_holds(tmp_path):
    assert config.PRECEDENCE == ("method", "recipe", "family", "params_file", "explicit")
    check_precedence(tmp_path)


@pytest.mark.parametrize("order", [o for o in itertools.permutations(config.PRECEDENCE) if o != config.PRECEDENCE][::7])
def test_another_order_of_the_layers_fails_the_check(order, tmp_path, monkeypatch):
    # the mutation in-process: the resolver folds its layers in another order, and the check sees it
    monkeypatch.setattr(config, "PRECEDENCE", order)
    with pytest.raises(AssertionError):
        check_precedence(tmp_path)


@pytest.mark.parametrize("pair", range(4))
def test_swapping_two_neighbouring_layers_fails_the_check(pair, tmp_path, monkeypatch):
    order = list(config.PRECEDENCE)
    order[pair], order[pair + 1] = order[pair + 1], order[pair]
    monkeypatch.setattr(config, "PRECEDENCE", tuple(order))
    with pytest.raises(AssertionError):
        check_precedence(tmp_path)


def test_a_length_set_above_replaces_the_recipes_length():
    # an explicit --steps beats a recipe's epochs, an explicit --epochs its steps (epochs x its 500 iterations)
    values = config.resolve("wild")
    assert config.effective_train(values)["steps"] == 10 * 500
    assert config.effective_train({**values, "train_steps": 7})["steps"] == 7
    assert config.effective_train({**values, "train_epochs": 2})["steps"] == 2 * 500
    assert config.effective_train({**config.resolve("demo"), "train_epochs": 2})["epochs"] == 2  # paper-style steps gone


def test_every_stage_takes_a_params_file(tmp_path):
    from typer.main import get_command

    from alignclip.cli import app

    commands = get_command(app).commands
    for stage in ("prepare", "similarity", "train", "evaluate", "report"):
        assert "params_file" in {p.name for p in commands[stage].params}, stage
