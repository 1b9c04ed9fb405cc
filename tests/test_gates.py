"""Attention gates captured from the modules' own forward passes."""
import copy

import pytest
import torch
import torch.nn.functional as F

import lgam
from lgam import BAM, CBAM, LGAM, SE, SGE, attention_gates, capture_gates
from lgam.attention import stage_of
from lgam.attention.lgam import lgam_reference


def _captured(module, x):
    with torch.no_grad(), capture_gates(module) as gates:
        module(x)
    return gates[""]  # the module itself is the root: its name is ""


def test_se_channel_weights():
    torch.manual_seed(0)
    se, x = SE(32, reduction=4).eval(), torch.randn(2, 32, 5, 5)
    w1, w2 = se.fc[0].weight, se.fc[2].weight
    expected = torch.sigmoid(F.relu(x.mean(dim=(2, 3)) @ w1.t()) @ w2.t())
    torch.testing.assert_close(_captured(se, x)["channel"], expected)


def test_cbam_spatial_and_channel_gates():
    torch.manual_seed(0)
    cbam, x = CBAM(32, reduction=4).eval(), torch.randn(2, 32, 6, 6)
    mlp = cbam.channel_gate.mlp
    channel = torch.sigmoid(mlp(x.mean(dim=(2, 3))) + mlp(x.amax(dim=(2, 3))))
    gated = x * channel[:, :, None, None]
    pooled = torch.cat([gated.amax(1, keepdim=True), gated.mean(1, keepdim=True)], 1)
    spatial = torch.sigmoid(cbam.spatial_gate.bn(F.conv2d(pooled, cbam.spatial_gate.conv.weight, padding=3)))
    gates = _captured(cbam, x)
    torch.testing.assert_close(gates["channel"], channel)
    torch.testing.assert_close(gates["spatial"], spatial)


def test_cbam_gate_description_names_its_batchnorm_when_it_has_one():
    """The app captions CBAM's gate with this formula; it once left out the official BN."""
    assert CBAM(32).gate_description.startswith("sigmoid(BN(conv7x7(")
    assert CBAM(32, spatial_bn=False, kernel_size=3).gate_description.startswith("sigmoid(conv3x3(")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("h, w", [(5, 3), (2, 2), (1, 3), (1, 5)], ids=["hw>g", "hw=g", "hw=g-1", "hw=g+1"])
def test_sge_group_maps_and_their_mean(channels_last, h, w):
    """The recorded maps are the gates of the forward, whatever H*W is against the group count
    (H*W == G once passed a plain-layout gate through as channels_last: 8x8 maps, 64 groups)."""
    torch.manual_seed(0)
    sge = SGE(16, groups=4)
    with torch.no_grad():
        sge.weight.normal_(), sge.bias.normal_()
    x = torch.randn(2, 16, h, w)
    xg = x.reshape(8, 4, h, w)
    t = (xg * xg.mean(dim=(2, 3), keepdim=True)).sum(1).view(2, 4, h * w)
    t = (t - t.mean(2, keepdim=True)) / (t.std(2, keepdim=True) + sge.eps)
    groups = torch.sigmoid(t.view(2, 4, h, w) * sge.weight + sge.bias)
    gates = _captured(sge, x.to(memory_format=torch.channels_last) if channels_last else x)
    torch.testing.assert_close(gates["groups"], groups)
    torch.testing.assert_close(gates["spatial"], groups.mean(1, keepdim=True))


@pytest.mark.parametrize("side", [3, 6])
def test_lgam_spatial_map_is_eq6(side, lgam_path):
    """M_spat = sigmoid(ReLU(sum over channels of A')), eqs (5)-(6), on both computation routes
    (the op and the plain tensor ops, whose recorded gates come from other formulas)."""
    torch.manual_seed(0)
    m = LGAM(32, groups=4, reduction=2).eval()
    x = torch.randn(2, 32, side, side)
    _, ys = lgam_reference(m, x, return_ladder=True)
    expected = torch.sigmoid(F.relu(torch.cat(ys, 1).sum(1, keepdim=True)))
    torch.testing.assert_close(_captured(m, x)["spatial"], expected, rtol=1e-5, atol=1e-6)


def test_bam_gate_averaged_over_channels():
    torch.manual_seed(0)
    bam, x = BAM(32, reduction=4).eval(), torch.randn(2, 32, 6, 6)
    ms = bam.spatial_gate(x)
    gate = torch.sigmoid(bam.channel_gate(x) + ms)
    gates = _captured(bam, x)
    torch.testing.assert_close(gates["spatial"], gate.mean(1, keepdim=True))
    torch.testing.assert_close(gates["spatial_logits"], ms)


@pytest.mark.parametrize("name,stages", [("resnet18_lgam", [1, 2, 3, 4]), ("resnet18_bam", [1, 2, 3]),
                                         ("resnet18_sge", [1, 2, 3, 4]), ("resnet18", [])])
def test_one_forward_per_batch_and_nothing_left_behind(name, stages):
    model = lgam.create_model(name, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    state = copy.deepcopy(model.state_dict())
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    gates = attention_gates(model, x)
    handle.remove()
    assert len(calls) == 1 and list(gates) == stages
    for stage, modules in gates.items():
        side = 64 // 2 ** (stage + 1)  # stem /4, then /2 per stage after the first
        for g in modules.values():
            assert g["spatial"].shape == (2, 1, side, side) and not g["spatial"].requires_grad
            assert 0 <= g["spatial"].min() and g["spatial"].max() <= 1
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not getattr(m, "record_gates", False) and getattr(m, "last_gates", None) is None
    with torch.no_grad():  # recording changed nothing: output, weights, BN statistics, mode
        torch.testing.assert_close(model(x), before)
    assert not model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_stage_names():
    assert stage_of("layer3.1.attention") == 3 and stage_of("stage_attention.0") == 1
    assert stage_of("backbone.layer4.0.attention") == 4 and stage_of("fc") is None


def test_lgam_records_its_group_channel_gates_in_eval_mode(lgam_path):
    """LGAM's eq-(2) gates M_k of every group, side by side as (B, C), in eval mode, on both
    computation routes; in train mode recording them would move BN's running statistics twice, so
    only the spatial map is kept. The oracle is the reference's ladder: M_k of z_k = x_k + y_(k-1)."""
    torch.manual_seed(0)
    lg = LGAM(32, groups=4, reduction=2)
    x = torch.randn(3, 32, 5, 5)
    lg.train()(torch.randn(8, 32, 5, 5))  # BN statistics of real input
    lg.eval()
    with torch.no_grad():
        _, ys = lgam_reference(lg, x, return_ladder=True)
        zs = [x_k if k == 0 else x_k + ys[k - 1] for k, x_k in enumerate(x.chunk(4, dim=1))]
        expected = torch.cat([lg.channel_attention[k](z.mean(dim=(2, 3))) for k, z in enumerate(zs)], 1)
    gates = _captured(lg, x)
    torch.testing.assert_close(gates["channel"], expected)
    assert gates["channel"].shape == (3, 32) and bool(((gates["channel"] >= 0.5) & (gates["channel"] <= 1)).all())
    stats = copy.deepcopy(lg.channel_attention[0].bn.state_dict())
    assert "channel" not in _captured(lg.train(), x)
    assert int(lg.channel_attention[0].bn.num_batches_tracked) == int(stats["num_batches_tracked"]) + 1  # one forward


def test_nested_captures_each_see_their_forwards_and_the_outer_keeps_its_own():
    """Leaving an inner capture once switched recording off and dropped the outer's gates."""
    model = lgam.create_model("resnet18_se", num_classes=5).eval()
    x, y = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    with torch.no_grad(), capture_gates(model) as outer:
        model(x)
        first = {k: v for k, v in model.layer4[1].attention.last_gates.items()}
        with capture_gates(model) as empty:
            pass
        assert model.layer4[1].attention.record_gates  # still the outer's
        with capture_gates(model) as inner:
            model(y)
    assert empty == {} and len(inner) == len(outer) == 8
    assert torch.equal(outer["layer4.1.attention"]["channel"], inner["layer4.1.attention"]["channel"])
    assert not torch.equal(first["channel"], inner["layer4.1.attention"]["channel"])
    with torch.no_grad(), capture_gates(model) as outer:
        model(x)
        with capture_gates(model):
            pass  # an inner block without a forward leaves the outer's gates alone
    assert torch.equal(outer["layer4.1.attention"]["channel"], first["channel"])
    assert not any(m.record_gates or m.last_gates is not None for m in model.modules()
                   if isinstance(m, lgam.attention.GateRecorder))


def test_attention_gates_refuses_a_model_in_training_mode():
    """It once ran the pass in train mode: batch statistics for the gates, running ones updated."""
    model = lgam.create_model("resnet18_lgam", num_classes=5)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lgam.errors.UsageError, match=r"call model.eval\(\) first"):
        attention_gates(model, torch.randn(2, 3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
