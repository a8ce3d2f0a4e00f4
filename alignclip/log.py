"""One logging set-up for the CLI and the library: readable lines, levels, no print spam."""

from __future__ import annotations

import logging
import os
import sys

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
        if sys.stderr.isatty():
            from rich.console import Console  # here: a pipe or a pod's log never pays for rich's import
            from rich.logging import RichHandler

            handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False, markup=False,
                                  log_time_format="[%X]")
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        else:
            # a pod's log, a CI log, a file: one line per record, never wrapped at 80 columns, so grep finds it
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
        root.handlers = [handler]
        # Third-party libraries are chatty at INFO; keep their warnings only.
        for name in ("mlflow", "kfp", "urllib3", "botocore", "PIL", "matplotlib", "alembic", "dvc"):
            logging.getLogger(name).setLevel(logging.WARNING)
        _CONFIGURED = True
    # open_clip logs its model-building steps on the root logger: keep the root at WARNING and give our own
    # loggers the chosen level.
    root.setLevel(max(logging.WARNING, logging.getLevelName(level) if isinstance(level, str) else level))
    logging.getLogger("alignclip").setLevel(level)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (test capture and redirection replace it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
