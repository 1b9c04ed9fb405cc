"""Backbones with an attention slot, and the model registry."""
from .registry import FIGURE5_MODELS, create_model, list_models, model_config, register_model
from .resnet import BasicBlock, ResNet, zero_init_residual
from .resnext import ResNeXt, ResNeXtBottleneck
from .wrn import WideBasicBlock, WideResNet

__all__ = [
    "FIGURE5_MODELS", "BasicBlock", "ResNet", "ResNeXt", "ResNeXtBottleneck", "WideBasicBlock", "WideResNet",
    "create_model", "list_models", "model_config", "register_model", "zero_init_residual",
]
