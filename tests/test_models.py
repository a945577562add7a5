"""Reference models: key layout of the reference code / RobustBench, shapes, parameter counts."""
import pytest
import torch

from awpfast.models import PreActResNet18, WideResNet, create_model

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def expected_preact_keys():
    keys = ["conv1.weight"]
    planes_in = 64
    for li, planes in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            pre = f"layer{li}.{b}."
            keys += [pre + "bn1." + k for k in BN] + [pre + "conv1.weight"]
            keys += [pre + "bn2." + k for k in BN] + [pre + "conv2.weight"]
            if b == 0 and (li > 1 or planes_in != planes):
                keys.append(pre + "shortcut.0.weight")
        planes_in = planes
    return keys + ["bn." + k for k in BN] + ["linear.weight", "linear.bias"]


def expected_wrn_keys(depth, sub_block1=False):
    n = (depth - 4) // 6
    keys = ["conv1.weight"]
    blocks = ["block1"] + (["sub_block1"] if sub_block1 else []) + ["block2", "block3"]
    for blk in blocks:
        for i in range(n):
            pre = f"{blk}.layer.{i}."
            keys += [pre + "bn1." + k for k in BN] + [pre + "conv1.weight"]
            keys += [pre + "bn2." + k for k in BN] + [pre + "conv2.weight"]
            if i == 0:
                keys.append(pre + "convShortcut.weight")
    return keys + ["bn1." + k for k in BN] + ["fc.weight", "fc.bias"]


def test_preact_keys_and_shapes():
    m = PreActResNet18(num_classes=10)
    sd = m.state_dict()
    assert list(sd) == expected_preact_keys()
    assert sd["layer2.0.shortcut.0.weight"].shape == (128, 64, 1, 1)
    assert sd["linear.weight"].shape == (10, 512)


@pytest.mark.parametrize("depth,params", [(34, 46_160_474), (28, 36_479_194)])
def test_wrn_keys_and_parameter_count(depth, params):
    m = WideResNet(depth=depth, widen_factor=10)
    assert list(m.state_dict()) == expected_wrn_keys(depth)
    assert sum(p.numel() for p in m.parameters()) == params
    assert m.state_dict()["block2.layer.0.convShortcut.weight"].shape == (320, 160, 1, 1)


def test_wrn_sub_block1_checkpoints_load_strict():
    src = WideResNet(depth=16, widen_factor=2, sub_block1=True)
    assert list(src.state_dict()) == expected_wrn_keys(16, sub_block1=True)
    dst = WideResNet(depth=16, widen_factor=2, sub_block1=True)
    dst.load_state_dict(src.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32)
    src.eval(), dst.eval()
    assert torch.equal(src(x), dst(x))


def test_normalization_is_not_in_the_state_dict():
    m = PreActResNet18(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert list(m.state_dict()) == expected_preact_keys()
    plain = PreActResNet18()
    plain.load_state_dict(m.state_dict(), strict=True)
    m.eval(), plain.eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(m(x), plain((x - 0.5) / 0.25), atol=1e-5)


def test_forward_shapes_and_bad_input():
    for name in ("preact18",):
        m = create_model(name, num_classes=7).eval()
        assert m(torch.rand(2, 3, 32, 32)).shape == (2, 7)
        assert m(torch.rand(2, 3, 16, 16)).shape == (2, 7)
    w = WideResNet(depth=10, widen_factor=1, num_classes=3).eval()
    assert w(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="3 channels"):
        w(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(depth=30)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet50")


def test_small_cnn_normalization_is_not_in_the_state_dict():
    from awpfast.models import SmallCNN
    torch.manual_seed(0)
    m = SmallCNN(width=4, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)).eval()
    plain = SmallCNN(width=4).eval()
    assert list(m.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(m.state_dict(), strict=True)
    x = torch.rand(3, 3, 16, 16)
    mean = torch.tensor((0.4, 0.5, 0.6)).view(1, 3, 1, 1)
    std = torch.tensor((0.2, 0.25, 0.3)).view(1, 3, 1, 1)
    torch.testing.assert_close(m(x), plain((x - mean) / std))
    with pytest.raises(ValueError, match="both mean and std"):
        SmallCNN(mean=(0.5, 0.5, 0.5))


def test_awpfast_exposes_the_stack():
    import awpfast
    assert awpfast.attacks.PGD and awpfast.losses.TRADESLoss and awpfast.models.PreActResNet18
    assert {"attacks", "losses", "models", "ops", "AWP"} <= set(awpfast.__all__)
