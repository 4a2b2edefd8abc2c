"""Export: the geometry an image is run at and the predictions, the files written (maps, .mat, masks,
annotated video), the detected targets and their table, panels, and the ONNX graph of the deploy form with ONNX
Runtime as a second backend. ``maps``, ``onnx_runtime``, ``writer``, ``outputs``, ``detections`` and
``detection_table`` import no torch (onnx_detect.py runs them without PyTorch); ``predict`` and ``onnx_export``
are the PyTorch side."""
from utils import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "maps": ("Geometry", "Prediction", "trained_geometry", "predict", "iter_predictions", "ArrayNetwork"),
    "predict": ("prepare_model",),
    "writer": ("export", "dataset_images", "default_weights"),
    "outputs": ("ExportError", "ExportInterrupted", "ExportOptions", "check_output", "check_not_inputs"),
    "detections": ("Detection", "Detector", "detect", "detect_logits", "draw_detections"),
    "detection_table": ("DetectionTable", "read_table"),
    "panels": ("save_panel", "decomposition_panel", "detection_outcome"),
    "onnx_export": ("OnnxExportError", "export_onnx", "check_onnx", "check_shapes"),
    "onnx_runtime": ("OnnxRuntimeNet", "prepare_backend", "BACKENDS"),
})
