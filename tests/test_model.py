import subprocess
import sys

import pytest
import torch

from conftest import REPO
from model import ResNet18, WideResNet, build_model, count_parameters


def test_resnet18_maps_cifar_images_to_100_logits():
    model = ResNet18()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert count_parameters(model) == 11_220_132


def test_resnet18_has_the_cifar_stem():
    model = ResNet18()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


def test_wideresnet_28_10_has_the_published_size():
    model = WideResNet()
    assert count_parameters(model) == 36_536_884
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_wideresnet_depth_must_be_6n_plus_4():
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(depth=27)


def test_build_model_passes_options_and_class_count():
    model = build_model("wideresnet", num_classes=10, depth=10, widen_factor=2, dropout=0.3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert model.stages[0][0].dropout.p == 0.3


def test_build_model_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="does not take depth"):
        build_model("resnet18", depth=28)


def test_importing_the_modules_has_no_side_effects(tmp_path):
    code = "import model, dataset_utils, device_utils, train_utils, train, plot"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_wideresnet_starts_from_he_fan_out_convolutions_and_identity_batchnorm():
    import math
    model = WideResNet(depth=16, widen_factor=4)
    conv = model.stages[1][1].conv1  # a stage-2 3x3 convolution, 128 -> 128 channels
    expected_std = math.sqrt(2 / (conv.out_channels * 9))  # He-normal, fan_out
    assert abs(conv.weight.std().item() - expected_std) < 0.05 * expected_std
    assert all((bn.weight == 1).all() and (bn.bias == 0).all()
               for bn in model.modules() if isinstance(bn, torch.nn.BatchNorm2d))
    assert (model.fc.bias == 0).all()
