"""torchvision architectures under BackdoorBench's names, built as its `generate_cls_model` builds them.

Each is `torchvision.models.<name>(weights=None, num_classes=num_classes)`, so state-dict keys match records
BackdoorBench saves. Nothing is ever downloaded: where BackdoorBench starts from ImageNet weights (vit_*,
convnext_tiny, pretrained vgg19_bn) the layout is the same but the weights start random.
ViTs are wrapped as Sequential(Resize((224, 224)), vit), as BackdoorBench does, so keys carry a `1.` prefix.
"""

from __future__ import annotations

import torch.nn as nn
import torchvision.models as tvm
from torchvision.transforms import Resize

from ftsam_plugin.models._registry import register_model

__all__ = ["TORCHVISION_NAMES", "VIT_NAMES"]

# BackdoorBench name -> keyword arguments beyond num_classes (all with weights=None).
TORCHVISION_NAMES = {
    "resnet18": {},
    "resnet34": {},
    "resnet50": {},
    "alexnet": {},
    "vgg11": {},
    "vgg16": {},
    "vgg19": {},
    "vgg19_bn": {},
    "squeezenet1_0": {},
    "densenet121": {},
    "densenet161": {},
    # aux_logits stays True (torchvision's default without weights, as in BackdoorBench): the aux heads are in the
    # state dict, and in training mode forward returns a namedtuple (logits first). init_weights=True only
    # silences torchvision's warning; it is what None means.
    "inception_v3": {"init_weights": True},
    "googlenet": {"init_weights": True},
    "shufflenet_v2_x1_0": {},
    "mobilenet_v2": {},
    "mobilenet_v3_large": {},
    "resnext50_32x4d": {},
    "wide_resnet50_2": {},
    "mnasnet1_0": {},
    "efficientnet_b0": {},
    "efficientnet_b3": {},
    "convnext_tiny": {},
}

VIT_NAMES = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32")


def _check(name: str, width: float, kwargs: dict) -> dict:
    if width != 1.0:
        raise ValueError(f"{name} does not support width={width}; only preactresnet18 has a width multiplier")
    kwargs = dict(kwargs)
    if kwargs.pop("pretrained", False) or kwargs.pop("weights", None) is not None:
        raise ValueError(f"{name}: pretrained weights would need a download, which ftsam never does; build it random")
    return kwargs


def _make_torchvision_builder(name: str, defaults: dict):
    def builder(num_classes: int = 10, image_size: int = 32, width: float = 1.0, **kwargs) -> nn.Module:
        extra = {**defaults, **_check(name, width, kwargs)}
        return getattr(tvm, name)(weights=None, num_classes=num_classes, **extra)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"torchvision {name}(weights=None, num_classes=...), as BackdoorBench builds it."
    return builder


def _make_vit_builder(name: str):
    def builder(num_classes: int = 10, image_size: int = 32, width: float = 1.0, **kwargs) -> nn.Module:
        # BackdoorBench loads ImageNet weights then replaces heads.head; the key layout equals num_classes= here.
        net = getattr(tvm, name)(weights=None, num_classes=num_classes, **_check(name, width, kwargs))
        return nn.Sequential(Resize((224, 224)), net)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"Sequential(Resize((224, 224)), torchvision {name}), as BackdoorBench builds it (random init)."
    return builder


for _name, _defaults in TORCHVISION_NAMES.items():
    if hasattr(tvm, _name):  # older torchvision lacks some (efficientnet, convnext, mobilenet_v3)
        register_model(_make_torchvision_builder(_name, _defaults))
for _name in VIT_NAMES:
    if hasattr(tvm, _name):
        register_model(_make_vit_builder(_name))
del _name, _defaults
