"""One logging set-up for the CLI and the library: readable lines, levels, no print spam."""

from __future__ import annotations

import logging
import os

from rich.console import Console
from rich.logging import RichHandler

_CONFIGURED = False


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root logger once. `ALIGNCLIP_LOG_LEVEL` overrides the default level (INFO)."""
    global _CONFIGURED
    level = level or os.environ.get("ALIGNCLIP_LOG_LEVEL", "INFO")
    if isinstance(level, str):
        level = level.upper()
    root = logging.getLogger()
    if not _CONFIGURED:
        # logs go to stderr: stdout carries what a command outputs (JSON of `evaluate`, `train --dry-run`, ...)
        handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False, markup=False,
                              log_time_format="[%X]")
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.handlers = [handler]
        # Third-party libraries are chatty at INFO; keep their warnings only.
        for name in ("mlflow", "kfp", "urllib3", "botocore", "PIL", "matplotlib", "alembic", "dvc"):
            logging.getLogger(name).setLevel(logging.WARNING)
        _CONFIGURED = True
    # open_clip logs its model-building steps on the root logger: keep the root at WARNING and give our own
    # loggers the chosen level.
    root.setLevel(max(logging.WARNING, logging.getLevelName(level) if isinstance(level, str) else level))
    logging.getLogger("alignclip").setLevel(level)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
