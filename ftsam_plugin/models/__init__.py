"""Model zoo: `create_model(name, num_classes, image_size, width)` for BackdoorBench's architectures.

Importing this package registers every architecture (each module runs its `@register_model` decorators).
"""

from ftsam_plugin.models import preact_resnet, torchvision_zoo  # noqa: F401  (registration on import)
from ftsam_plugin.models._registry import create_model, list_models, register_model
from ftsam_plugin.models.preact_resnet import PreActBlock, PreActResNet

__all__ = ["create_model", "list_models", "register_model", "PreActBlock", "PreActResNet"]
