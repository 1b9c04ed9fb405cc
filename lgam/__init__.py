"""lgam: LGAM (Zhang, Li, Yang, 2020) and the attention modules it is compared with, in PyTorch."""
from .attention import (BAM, CBAM, LGAM, SE, SGE, attention_gates, capture_gates, create_attention,
                        set_fused_kernels)
from .models import create_model, list_models

#: the submodules ``lgam.NAME`` reaches without importing it first (as ``timm.data``, but loaded on
#: first use: ``import lgam`` stays light)
SUBMODULES = ("cam", "checkpoints", "curves", "data", "device", "engine", "errors", "evaluate", "figure",
              "gatestats", "imageio", "params", "recipes", "table4", "train")

__version__ = "0.1.0"
__all__ = ["BAM", "CBAM", "LGAM", "SE", "SGE", "attention_gates", "capture_gates", "create_attention",
           "create_model", "list_models", "set_fused_kernels"]


def __getattr__(name: str):
    if name in SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lgam' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SUBMODULES))
