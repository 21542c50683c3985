import importlib.util
import os
import warnings

import pytest
import torch
import torchvision.models as tvm

from ftsam_plugin.errors import FtsamError
from ftsam_plugin.models import create_model, list_models, register_model
from ftsam_plugin.models import _registry

# ---- Reference: BackdoorBench models/preact_resnet.py PreActResNet18(num_classes=10) state dict ----
# Read off its architecture: 3x3 stem conv1 (no bias, no BN); layer1..layer4 of two PreActBlocks
# (bn1, conv1, bn2, conv2, and shortcut.0 = 1x1 conv in the first block of layers 2-4); no final BN; linear.
PREACTRESNET18_STATE = [
    ('conv1.weight', (64, 3, 3, 3)),
    ('layer1.0.bn1.weight', (64,)),
    ('layer1.0.bn1.bias', (64,)),
    ('layer1.0.bn1.running_mean', (64,)),
    ('layer1.0.bn1.running_var', (64,)),
    ('layer1.0.bn1.num_batches_tracked', ()),
    ('layer1.0.conv1.weight', (64, 64, 3, 3)),
    ('layer1.0.bn2.weight', (64,)),
    ('layer1.0.bn2.bias', (64,)),
    ('layer1.0.bn2.running_mean', (64,)),
    ('layer1.0.bn2.running_var', (64,)),
    ('layer1.0.bn2.num_batches_tracked', ()),
    ('layer1.0.conv2.weight', (64, 64, 3, 3)),
    ('layer1.1.bn1.weight', (64,)),
    ('layer1.1.bn1.bias', (64,)),
    ('layer1.1.bn1.running_mean', (64,)),
    ('layer1.1.bn1.running_var', (64,)),
    ('layer1.1.bn1.num_batches_tracked', ()),
    ('layer1.1.conv1.weight', (64, 64, 3, 3)),
    ('layer1.1.bn2.weight', (64,)),
    ('layer1.1.bn2.bias', (64,)),
    ('layer1.1.bn2.running_mean', (64,)),
    ('layer1.1.bn2.running_var', (64,)),
    ('layer1.1.bn2.num_batches_tracked', ()),
    ('layer1.1.conv2.weight', (64, 64, 3, 3)),
    ('layer2.0.bn1.weight', (64,)),
    ('layer2.0.bn1.bias', (64,)),
    ('layer2.0.bn1.running_mean', (64,)),
    ('layer2.0.bn1.running_var', (64,)),
    ('layer2.0.bn1.num_batches_tracked', ()),
    ('layer2.0.conv1.weight', (128, 64, 3, 3)),
    ('layer2.0.bn2.weight', (128,)),
    ('layer2.0.bn2.bias', (128,)),
    ('layer2.0.bn2.running_mean', (128,)),
    ('layer2.0.bn2.running_var', (128,)),
    ('layer2.0.bn2.num_batches_tracked', ()),
    ('layer2.0.conv2.weight', (128, 128, 3, 3)),
    ('layer2.0.shortcut.0.weight', (128, 64, 1, 1)),
    ('layer2.1.bn1.weight', (128,)),
    ('layer2.1.bn1.bias', (128,)),
    ('layer2.1.bn1.running_mean', (128,)),
    ('layer2.1.bn1.running_var', (128,)),
    ('layer2.1.bn1.num_batches_tracked', ()),
    ('layer2.1.conv1.weight', (128, 128, 3, 3)),
    ('layer2.1.bn2.weight', (128,)),
    ('layer2.1.bn2.bias', (128,)),
    ('layer2.1.bn2.running_mean', (128,)),
    ('layer2.1.bn2.running_var', (128,)),
    ('layer2.1.bn2.num_batches_tracked', ()),
    ('layer2.1.conv2.weight', (128, 128, 3, 3)),
    ('layer3.0.bn1.weight', (128,)),
    ('layer3.0.bn1.bias', (128,)),
    ('layer3.0.bn1.running_mean', (128,)),
    ('layer3.0.bn1.running_var', (128,)),
    ('layer3.0.bn1.num_batches_tracked', ()),
    ('layer3.0.conv1.weight', (256, 128, 3, 3)),
    ('layer3.0.bn2.weight', (256,)),
    ('layer3.0.bn2.bias', (256,)),
    ('layer3.0.bn2.running_mean', (256,)),
    ('layer3.0.bn2.running_var', (256,)),
    ('layer3.0.bn2.num_batches_tracked', ()),
    ('layer3.0.conv2.weight', (256, 256, 3, 3)),
    ('layer3.0.shortcut.0.weight', (256, 128, 1, 1)),
    ('layer3.1.bn1.weight', (256,)),
    ('layer3.1.bn1.bias', (256,)),
    ('layer3.1.bn1.running_mean', (256,)),
    ('layer3.1.bn1.running_var', (256,)),
    ('layer3.1.bn1.num_batches_tracked', ()),
    ('layer3.1.conv1.weight', (256, 256, 3, 3)),
    ('layer3.1.bn2.weight', (256,)),
    ('layer3.1.bn2.bias', (256,)),
    ('layer3.1.bn2.running_mean', (256,)),
    ('layer3.1.bn2.running_var', (256,)),
    ('layer3.1.bn2.num_batches_tracked', ()),
    ('layer3.1.conv2.weight', (256, 256, 3, 3)),
    ('layer4.0.bn1.weight', (256,)),
    ('layer4.0.bn1.bias', (256,)),
    ('layer4.0.bn1.running_mean', (256,)),
    ('layer4.0.bn1.running_var', (256,)),
    ('layer4.0.bn1.num_batches_tracked', ()),
    ('layer4.0.conv1.weight', (512, 256, 3, 3)),
    ('layer4.0.bn2.weight', (512,)),
    ('layer4.0.bn2.bias', (512,)),
    ('layer4.0.bn2.running_mean', (512,)),
    ('layer4.0.bn2.running_var', (512,)),
    ('layer4.0.bn2.num_batches_tracked', ()),
    ('layer4.0.conv2.weight', (512, 512, 3, 3)),
    ('layer4.0.shortcut.0.weight', (512, 256, 1, 1)),
    ('layer4.1.bn1.weight', (512,)),
    ('layer4.1.bn1.bias', (512,)),
    ('layer4.1.bn1.running_mean', (512,)),
    ('layer4.1.bn1.running_var', (512,)),
    ('layer4.1.bn1.num_batches_tracked', ()),
    ('layer4.1.conv1.weight', (512, 512, 3, 3)),
    ('layer4.1.bn2.weight', (512,)),
    ('layer4.1.bn2.bias', (512,)),
    ('layer4.1.bn2.running_mean', (512,)),
    ('layer4.1.bn2.running_var', (512,)),
    ('layer4.1.bn2.num_batches_tracked', ()),
    ('layer4.1.conv2.weight', (512, 512, 3, 3)),
    ('linear.weight', (10, 512)),
    ('linear.bias', (10,)),
]

EXPECTED_NAMES = {
    "preactresnet18", "resnet18", "resnet34", "resnet50", "vgg11", "vgg16", "vgg19", "vgg19_bn", "alexnet",
    "densenet121", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0", "googlenet",
    "squeezenet1_0", "resnext50_32x4d", "wide_resnet50_2", "mnasnet1_0",
}
# Huge (>100M parameters): built only where the test is about them.
HEAVY = {"alexnet", "vgg11", "vgg16", "vgg19", "vgg19_bn", "vit_l_16", "vit_l_32", "vit_b_16", "vit_b_32",
         "wide_resnet50_2", "convnext_tiny", "densenet161", "inception_v3"}


def _layout(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_reference_list_is_complete():
    assert len(PREACTRESNET18_STATE) == 102  # 54 parameters + 16 BatchNorms x 3 buffers
    assert len({k for k, _ in PREACTRESNET18_STATE}) == 102


def test_preactresnet18_layout_equals_backdoorbench_reference():
    model = create_model("preactresnet18", num_classes=10)
    assert _layout(model) == PREACTRESNET18_STATE
    names = [k for k, _ in model.named_parameters()] + [k for k, _ in model.named_buffers()]
    assert sorted(names) == sorted(k for k, _ in PREACTRESNET18_STATE)
    assert not any(k.startswith("bn.") or k.startswith("bn_final") for k in names)  # no final BN-ReLU


def test_preactresnet18_num_classes_and_image_sizes():
    model = create_model("PreActResNet18", num_classes=43).eval()
    assert model.linear.weight.shape == (43, 512)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 43)
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 43)


def test_preactresnet18_width_multiplier():
    model = create_model("preactresnet18", num_classes=10, width=0.25)
    shapes = dict(_layout(model))
    assert shapes["conv1.weight"] == (16, 3, 3, 3)
    assert shapes["layer2.0.shortcut.0.weight"] == (32, 16, 1, 1)
    assert shapes["layer3.1.conv2.weight"] == (64, 64, 3, 3)
    assert shapes["layer4.0.conv1.weight"] == (128, 64, 3, 3)
    assert shapes["linear.weight"] == (10, 128)
    # Same names as width 1.0, only the shapes change.
    assert [k for k, _ in _layout(model)] == [k for k, _ in PREACTRESNET18_STATE]
    model.train()
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert model.conv1.weight.grad is not None
    tiny = create_model("preactresnet18", width=0.001)  # rounds to 0 -> clamped to 1 channel
    assert tiny.conv1.weight.shape == (1, 3, 3, 3) and tiny.linear.weight.shape == (10, 1)


def test_preactresnet18_matches_hand_forward():
    # Independent functional forward of the reference architecture, using the model's own weights.
    import torch.nn.functional as F

    model = create_model("preactresnet18", width=0.125).eval()
    sd = model.state_dict()

    def bn(x, p):
        return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"])

    def block(x, p, stride):
        pre = F.relu(bn(x, p + ".bn1"))
        sc = F.conv2d(pre, sd[p + ".shortcut.0.weight"], stride=stride) if p + ".shortcut.0.weight" in sd else x
        out = F.conv2d(pre, sd[p + ".conv1.weight"], stride=stride, padding=1)
        out = F.conv2d(F.relu(bn(out, p + ".bn2")), sd[p + ".conv2.weight"], padding=1)
        return out + sc

    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h = F.conv2d(x, sd["conv1.weight"], padding=1)
        for layer, stride in zip((1, 2, 3, 4), (1, 2, 2, 2)):
            h = block(h, f"layer{layer}.0", stride)
            h = block(h, f"layer{layer}.1", 1)
        ref = F.linear(h.mean(dim=(2, 3)), sd["linear.weight"], sd["linear.bias"])
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def _load_backdoorbench_preact():
    root = os.environ.get("BACKDOORBENCH_ROOT")
    if not root:
        pytest.skip("BACKDOORBENCH_ROOT is not set (point it at a BackdoorBench checkout to compare with its model)")
    path = os.path.join(root, "models", "preact_resnet.py")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found")
    spec = importlib.util.spec_from_file_location("_bb_preact_resnet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PreActResNet18


@pytest.mark.parametrize("num_classes", [10, 43])
def test_preactresnet18_equals_backdoorbench_model(num_classes):
    bb_cls = _load_backdoorbench_preact()
    bb = bb_cls(num_classes=num_classes)
    ours = create_model("preactresnet18", num_classes=num_classes)
    assert _layout(ours) == _layout(bb)
    x = torch.randn(4, 3, 32, 32)
    # BB -> ours
    for p in bb.parameters():
        p.data.normal_(0, 0.05)
    bb.train()(torch.randn(8, 3, 32, 32))  # non-trivial running stats
    ours.load_state_dict(bb.state_dict(), strict=True)
    bb.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), bb(x), rtol=0, atol=0)
    # ours -> BB
    for p in ours.parameters():
        p.data.normal_(0, 0.05)
    bb.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), ours(x), rtol=0, atol=0)
        big = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(bb(big), ours(big), rtol=0, atol=0)


def test_registered_names():
    names = list_models()
    assert EXPECTED_NAMES <= set(names)
    assert names == sorted(names) and all(n == n.lower() for n in names)


@pytest.mark.parametrize("name", sorted(set(list_models()) - HEAVY - {"preactresnet18"}))
def test_torchvision_layout_matches_torchvision_and_forwards(name):
    model = create_model(name, num_classes=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):  # layout only; skips the slow init
            reference = getattr(tvm, name)(num_classes=7)  # BackdoorBench's call
    assert _layout(model) == _layout(reference)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)


def test_vgg19_bn_43_classes():
    model = create_model("vgg19_bn", num_classes=43)
    assert model.classifier[-1].out_features == 43
    with torch.device("meta"):
        reference = tvm.vgg19_bn(num_classes=43)
    assert _layout(model) == _layout(reference)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 43)


def test_vit_is_wrapped_like_backdoorbench():
    if "vit_b_32" not in list_models():
        pytest.skip("this torchvision has no vit")
    model = create_model("vit_b_32", num_classes=10)
    keys = list(model.state_dict())
    assert all(k.startswith("1.") for k in keys)
    assert "1.heads.head.weight" in keys and model.state_dict()["1.heads.head.weight"].shape == (10, 768)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_unknown_model_lists_known_names():
    with pytest.raises(FtsamError) as info:
        create_model("resnet9000")
    message = str(info.value)
    assert message.startswith("unknown model 'resnet9000'; known: ")
    assert "preactresnet18" in message and "vgg19_bn" in message and "\n" not in message


@pytest.mark.parametrize(
    "kwargs",
    [{"num_classes": 0}, {"num_classes": 2.5}, {"image_size": 0}, {"width": 0}, {"width": -1.0}],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        create_model("preactresnet18", **kwargs)


def test_width_and_pretrained_rejected_for_torchvision():
    with pytest.raises(ValueError, match="width"):
        create_model("resnet18", width=0.5)
    with pytest.raises(ValueError, match="download"):
        create_model("resnet18", pretrained=True)


def test_register_model_keys_lowercase_and_warns_on_reregister(monkeypatch):
    monkeypatch.setattr(_registry, "_model_entrypoints", dict(_registry._model_entrypoints))

    def TinyNet(num_classes=10, image_size=32, width=1.0):
        return torch.nn.Linear(image_size, num_classes)

    register_model(TinyNet)
    assert "tinynet" in list_models()
    assert create_model("TINYNET", num_classes=3, image_size=5).weight.shape == (3, 5)

    def tinynet(num_classes=10, image_size=32, width=1.0):
        return torch.nn.Linear(1, 1)

    with pytest.warns(UserWarning, match="already registered"):
        register_model(tinynet)
    assert create_model("tinynet").weight.shape == (1, 1)
