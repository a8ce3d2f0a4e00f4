"""Where a number came from: the code (git commit, image) and the data (DVC version or manifest digest) of a run,
as MLflow tags."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path


def provenance_tags() -> dict[str, str]:
    """git commit and image tag, so every number leads back to the code that made it."""
    tags = {}
    # The code's own checkout, not the working directory: stages may run anywhere (a KFP task's cwd, a temp dir).
    project = Path(__file__).resolve().parents[2]
    commit = os.environ.get("ALIGNCLIP_GIT_COMMIT") or checkout_commit(project)
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    # The data version is not a property of the checkout (data.dvc) but of the data a stage read:
    # data_tags below, from the prepared dataset's root and manifest.
    if os.environ.get("ALIGNCLIP_IMAGE"):
        tags["image"] = os.environ["ALIGNCLIP_IMAGE"]
    return tags


def checkout_commit(project: Path) -> str | None:
    """HEAD of the checkout, with ``-dirty`` when tracked files differ from it (as the image's GIT_COMMIT build
    argument, Makefile): a number made by uncommitted code must not name a commit as its source. None outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(project), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        clean = subprocess.run(["git", "-C", str(project), "diff", "--quiet", "HEAD", "--"], capture_output=True,
                               timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return None
    return commit if clean else f"{commit}-dirty"


def manifest_digest(manifest) -> str:
    """Content hash of a prepared manifest (paths, labels, domains, splits): the dataset's identity in MLflow."""
    import pandas as pd

    values = pd.util.hash_pandas_object(manifest.reset_index(drop=True), index=False).to_numpy()
    return hashlib.sha256(values.tobytes()).hexdigest()[:16]


def data_tags(meta: dict, manifest) -> dict:
    """Where the data came from, truthfully: the DVC hash only when the root is the folder ``data.dvc`` tracks
    (as the pipeline checked it out), else the manifest's content digest; the root is always named."""
    root = str(meta.get("root", ""))
    digest = manifest_digest(manifest)
    tags = {"data_source": root, "data_digest": digest}
    explicit = os.environ.get("ALIGNCLIP_DATA_VERSION")
    dvc_md5 = _dvc_tracked_md5(root)
    if explicit:
        tags["data_version"] = explicit
    elif dvc_md5:
        tags["data_version"] = f"dvc:{dvc_md5}"
    else:
        tags["data_version"] = f"manifest:{digest}"
    return tags


def _dvc_tracked_md5(root: str) -> str | None:
    """The md5 of the ``.dvc`` file whose output holds ``root`` (searched from ``root`` upwards), or None."""
    if not root or "://" in root:
        return None
    import yaml

    path = Path(root).resolve()
    for folder in (path, *path.parents):
        dvc_file = folder.parent / f"{folder.name}.dvc"
        if dvc_file.is_file():
            for out in (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", []):
                if (dvc_file.parent / out.get("path", "")).resolve() == folder and out.get("md5"):
                    return str(out["md5"])
    return None
