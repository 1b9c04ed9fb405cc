"""lgam: LGAM (Zhang, Li, Yang, 2020) and the attention modules it is compared with, in PyTorch."""
from .attention import (BAM, CBAM, LGAM, SE, SGE, attention_gates, capture_gates, create_attention,
                        set_fused_kernels)
from .models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["BAM", "CBAM", "LGAM", "SE", "SGE", "attention_gates", "capture_gates", "create_attention",
           "create_model", "list_models", "set_fused_kernels"]
