"""Backbones with an attention slot, and the model registry."""
from .registry import FIGURE5_MODELS, create_model, list_models, model_config, register_model
from .branch_init import init_residual_bn, match_branch_rms, zero_init_residual
from .resnet import BasicBlock, ResNet
from .resnext import ResNeXt, ResNeXtBottleneck
from .wrn import WideBasicBlock, WideResNet

__all__ = [
    "FIGURE5_MODELS", "BasicBlock", "ResNet", "ResNeXt", "ResNeXtBottleneck", "WideBasicBlock", "WideResNet",
    "create_model", "list_models", "model_config", "register_model", "init_residual_bn", "match_branch_rms",
    "zero_init_residual",
]
