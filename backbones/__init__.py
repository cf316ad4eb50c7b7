"""One registry of backbones: ResNet (original, B, C, D; 18-152), MobileNet, Inception-V3, and (not in the
paper) airbench's CIFAR-10 speedrun network.

Importing this package registers every network; ``create_backbone(name, ...)`` builds one.
Only torch (and safetensors, for weights I/O) is imported here.
"""
from ._base import IMAGENET_MEAN, IMAGENET_STD, Backbone, FeatureInfo, FrozenBatchNorm2d, convert_norm, init_weights
from ._registry import BackboneArgumentError, create_backbone, get_builder, list_backbones, register_backbone
from .complexity import count_macs, count_params, profile_backbone
from .weights import load_state_dict, load_weights, read_metadata, save_weights

# The one place where the networks are registered (explicit imports, no discovery magic).
from . import airbench, inception, mobilenet, resnet  # noqa: E402,F401  isort: skip

__all__ = [
    "Backbone", "BackboneArgumentError", "FeatureInfo", "FrozenBatchNorm2d", "IMAGENET_MEAN", "IMAGENET_STD",
    "convert_norm", "count_macs", "count_params", "create_backbone", "get_builder", "init_weights",
    "list_backbones", "load_state_dict", "load_weights", "profile_backbone", "read_metadata",
    "register_backbone", "save_weights",
]
