"""Scoring: IoU, nIoU, Pd, Fa, F1 and AUC under the release's protocol and the standard one, the connected
components and ROC they rest on, scoring folders of predictions with their reports, and the figures."""
from utils import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "metrics": ("Evaluator", "score_map"),
    "protocols": ("MetricConfig", "PRESETS", "METRIC_KEYS", "InvalidPredictionError"),
    "components": ("components", "match_targets"),
    "roc": ("RocCurve", "roc_thresholds"),
    "folders": ("PROTOCOLS", "score_folders", "write_report", "format_table"),
    "figures": ("save_roc_figure",),
})
