"""Tracking: the only part of alignclip that imports MLflow (tests/test_tracking_boundary.py holds every other
module to that), and only inside its functions, so the library imports and runs without it. Without a tracking URI
every call is a no-op.

Its modules, each importing only those above it (no cycle):

* ``client``: which store (an explicit URI, else ``MLFLOW_TRACKING_URI``) and the one client for it; never MLflow's
  process-global URI, which anything earlier in the process may have set.
* ``transport``: how records travel (background sender, spool on disk while the server is away, replay).
* ``provenance``: git commit, image and data version of a run.
* ``registry``: registered models, their versions' descriptions, the best-version alias (chosen by
  source-validation accuracy, the project's model-selection rule).
* ``runs``: the run model: names and tags, the pipeline's parent run, the comparison view.
* ``tracker``: a stage's run (``start_run``, ``Tracker``), its parent, the link it prints.

Other modules call the names below.
"""

from alignclip.tracking.client import tracking_uri
from alignclip.tracking.provenance import data_tags, manifest_digest, provenance_tags
from alignclip.tracking.registry import (
    alias_for,
    describe_model_version,
    describe_registered_model,
    registered_name,
    set_best_aliases,
)
from alignclip.tracking.runs import (
    PERCENT_NOTE,
    cell_run_name,
    cell_tags,
    display_metrics,
    dvc_pipeline_view,
    finish_pipeline_run,
    kfp_view_key,
    log_pipeline_artifact,
    mark_failed,
    metric_key,
    open_pipeline_run,
    report_metrics,
    summary_metrics,
    ui_base,
    use_experiment,
    view_url,
)
from alignclip.tracking.tracker import Tracker, _answers, pipeline_run_id, resumable, start_run, view_line
from alignclip.tracking.transport import pending_spools, spool_dir, sync

__all__ = [
    "PERCENT_NOTE", "Tracker", "alias_for", "cell_run_name", "cell_tags", "data_tags", "describe_model_version",
    "describe_registered_model", "display_metrics", "dvc_pipeline_view", "finish_pipeline_run", "kfp_view_key",
    "log_pipeline_artifact", "manifest_digest", "mark_failed", "metric_key", "open_pipeline_run", "pending_spools",
    "pipeline_run_id", "provenance_tags", "registered_name", "report_metrics", "resumable", "set_best_aliases",
    "spool_dir", "start_run", "summary_metrics", "sync", "tracking_uri", "ui_base", "use_experiment", "view_line",
    "view_url",
]
