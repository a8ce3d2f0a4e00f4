"""What each stage writes and the next one reads: file names and the checkpoint schema, defined once.

    prepare     -> MANIFEST, META                          (alignclip.data.prepare)
    similarity  -> SIMILARITY_MATRIX, SIMILARITY_CSV, SIMILARITY_HEATMAP
    train       -> MODEL (a Checkpoint), TRAIN_SUMMARY, TRAIN_LOG
    evaluate    -> METRICS, SCORES, PREDICTIONS            (reads MODEL: held-out domain, method, label space)
    report      -> REPORT_PAGE, REPORT_MARKDOWN, tables and figures

DVC (dvc.yaml) and the KFP components name the same files; tests/test_artifacts.py checks dvc.yaml against this.
Reading a checkpoint back is here too (``load_torch``, ``load_checkpoint``); writing one is ``publish.save_checkpoint``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

# torch is imported where a checkpoint is read: the CLI reads these names before a command runs

MANIFEST = "manifest.parquet"
META = "meta.json"
SIMILARITY_MATRIX = "similarity.pt"
SIMILARITY_CSV = "similarity.csv"
SIMILARITY_HEATMAP = "similarity.png"
MODEL = "model.pt"
TRAIN_SUMMARY = "train.json"
TRAIN_LOG = "train_log.csv"
METRICS = "metrics.json"
SCORES = "scores.json"  # the accuracies alone (percent): the narrow file `dvc metrics show` reads
PREDICTIONS = "predictions.parquet"
# What a stage may find in the folder it replaces whole; anything else there (another stage's outputs, the user's
# files) makes it stop before any work: `train out/prep out/prep` must not delete the prepared dataset.
CELL_FILES = frozenset({MODEL, TRAIN_SUMMARY, TRAIN_LOG, METRICS, SCORES, PREDICTIONS})  # train's, with evaluate's beside
SIMILARITY_FILES = frozenset({SIMILARITY_MATRIX, SIMILARITY_CSV, SIMILARITY_HEATMAP})
REPORT_PAGE = "index.html"
REPORT_MARKDOWN = "index.md"

CHECKPOINT_SCHEMA = 1


@dataclass
class Checkpoint:
    """The content of ``model.pt``: the fine-tuned image encoder and everything needed to rebuild and score it.

    Plain tensors and Python values only, so it loads with ``torch.load(weights_only=True)``.
    """

    visual: dict | None  # state dict of the image encoder; None: the pre-trained one (zero-shot)
    method: dict  # MethodConfig.to_dict()
    variant: str  # row label of reports: method, formulation and changed switches
    architecture: str
    pretrained: str | None
    model: str  # preset name or open_clip architecture asked for
    formulation: str
    seed: int
    recipe: str | None
    dataset: str
    protocol: str
    test_domain: str | None  # held-out domain (domainbed, wild); None otherwise
    label_space: list[int]  # global classes the training classifier scored against
    classes: list[str]  # their names, so evaluation can refuse a prepared dataset with other classes
    schema: int = CHECKPOINT_SCHEMA


def load_torch(source, what: str = "checkpoint"):
    """``torch.load`` with ``weights_only=True`` on CPU; a bad or unsafe file is one ``ValueError`` naming it.

    ``source`` is a path or a binary file object (bytes read from object storage). The one way the project reads
    a ``.pt`` file: ``weights_only=True`` refuses any pickle that would build objects other than tensors and plain
    containers, so a checkpoint shared by someone else cannot run code here. (Written by ``alignclip.publish``.)
    """
    import pickle
    import zipfile

    import torch

    name = source if isinstance(source, (str, Path)) else getattr(source, "name", "<bytes>")
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise FileNotFoundError(f"{what} not found: {source}")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names a refused global (e.g. "unsupported GLOBAL posix.system"); other unpickling errors mean
        # the bytes are not a pickle at all.
        refused = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), None)
        if refused:
            raise ValueError(
                f"{name}: refused to load this {what}: it holds Python objects other than tensors and plain data, "
                f"which could run code ({refused})"
            ) from None
        raise ValueError(f"{name}: not a valid {what} (not a torch file)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, AttributeError, IndexError) as err:
        raise ValueError(f"{name}: not a valid {what} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'empty or truncated file'})") from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint; a file that is not one of ours is a ValueError naming it and what is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (the {MODEL} of `alignclip train`)")
    # weights_only: a pickle that would run code is refused; any other bad file is one line naming it
    state = load_torch(path, "model checkpoint")
    expected = {f.name for f in fields(Checkpoint)}
    if not isinstance(state, dict) or expected - set(state):
        missing = sorted(expected - set(state)) if isinstance(state, dict) else sorted(expected)
        raise ValueError(f"{path}: not an alignclip checkpoint of schema {CHECKPOINT_SCHEMA} (missing {missing}); re-run `alignclip train`")
    if state["schema"] != CHECKPOINT_SCHEMA:
        raise ValueError(f"{path}: checkpoint schema {state['schema']}, expected {CHECKPOINT_SCHEMA}; re-run `alignclip train`")
    return Checkpoint(**{k: state[k] for k in expected})
