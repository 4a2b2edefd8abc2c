"""Reading and writing: image files as the release reads them, its geometry (resizes, labels), videos and
frame folders, and the runtime set-up every script shares (device, precision, CPU memory and threads).
Imports nothing else of utils."""
from utils import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "images": ("IMAGE_SUFFIXES", "MASK_RESAMPLING", "ImageReadError", "list_images", "read_image", "read_gray",
               "read_mask", "write_png", "refuse_to_replace", "release_image", "release_targets", "resize_linear",
               "resize_nearest", "resize_mask_centres", "soft_labels", "to_unit", "quiet_opencv",
               "set_opencv_log_level"),
    "video": ("FrameSource", "VideoSourceError", "ReadSummary", "iter_frames", "list_frames"),
    "frame_writer": ("FrameWriter", "VIDEO_CODECS", "LOSSLESS_CODEC", "to_bgr"),
    "runtime": ("RuntimeOptions", "add_runtime_arguments", "runtime_from_args", "resolve_device"),
    "cpu_memory": ("configure_cpu_malloc", "limit_openmp_spinning"),
})
