"""peftvision: parameter-efficient fine-tuning for timm and diffusers vision models."""

__version__ = "0.1.0"

# public modules: Hub transfer of folders; the methods subpackage, which pv.methods() calls
# to list the registered methods; progress bars; quantized (bitsandbytes) bases, imported lazily
from . import hub, methods, progress, quant
from .api import apply, config, merge, unload, unmerge
from .checkpoint import save_adapter
from .errors import (
                     AdapterLoadError,
                     ConfigError,
                     CorruptAdapterError,
                     MergeError,
                     NotAppliedError,
                     OfflineError,
                     PeftVisionError,
                     TargetError,
                     UnknownMethodError,
                     UnsupportedArchitectureError,
)
from .loading import load_adapter
from .mixing import add_weighted_adapter
from .named import active_adapters, adapters, delete_adapter, disable_adapters, set_adapter
from .record import AppliedRecord, MethodRecord, applied
from .registry import get_method, register_method
from .report import Report, report
from .routing import adapter_per_sample
from .scale import set_scale
from .sharing import push_to_hub
from .zoo import create_model, load_local_weights

__all__ = [
    "__version__", "apply", "config", "merge", "unmerge", "unload", "report", "Report",
    "adapters", "active_adapters", "set_adapter", "delete_adapter", "disable_adapters",
    "adapter_per_sample",
    "add_weighted_adapter", "set_scale",
    "save_adapter", "load_adapter", "push_to_hub", "methods", "get_method", "register_method",
    "applied", "AppliedRecord", "MethodRecord", "create_model", "load_local_weights",
    "PeftVisionError", "ConfigError", "UnknownMethodError", "TargetError",
    "UnsupportedArchitectureError", "MergeError", "NotAppliedError", "AdapterLoadError", "CorruptAdapterError",
    "OfflineError", "progress", "hub", "quant",
]
