"""SE, SGE, CBAM, BAM: hand-computed cases, shapes, and argument errors."""
import copy
import math
import re

import numpy as np
import pytest
import torch

import lgam

from lgam import BAM, CBAM, LGAM, SE, SGE, create_attention
from lgam.attention.sge import sge_reference

pytestmark = pytest.mark.usefixtures("on_every_device")  # CPU, and CUDA where there is a GPU

sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731


def test_sge_hand_computed():
    sge = SGE(2, groups=1)
    with torch.no_grad():
        sge.weight.fill_(1.0), sge.bias.fill_(0.0)
    x = torch.tensor([[[[1.0, 2.0, 3.0]], [[0.0, 0.0, 3.0]]]])  # (1, 2, 1, 3)
    # group mean feature (2, 1); similarity per position: 2, 4, 9 -> mean 5, deviations -3, -1, 4
    std = math.sqrt((9 + 1 + 16) / 2)  # unbiased
    gate = [sig(d / (std + 1e-5)) for d in (-3.0, -1.0, 4.0)]
    expected = torch.tensor([[[[1 * gate[0], 2 * gate[1], 3 * gate[2]]],
                              [[0.0, 0.0, 3 * gate[2]]]]])
    torch.testing.assert_close(sge(x), expected)


def test_sge_initialisation_is_a_constant_gate_of_sigmoid_1():
    sge = SGE(128, groups=64)  # gamma=0, beta=1 -> sigmoid(1) everywhere
    x = torch.randn(2, 128, 5, 5)
    torch.testing.assert_close(sge(x), x * sig(1.0))
    assert sge.weight.shape == sge.bias.shape == (1, 64, 1, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["one position", "constant", "spread over 256"])
def test_sge_in_16_bits_keeps_the_statistics_of_float32(dtype, case):
    """In float16 1 / eps overflowed (NaN where a group's similarity is constant: 1 x 1 maps, a
    flat image) and a variance past 65,504 was inf (every gate sigmoid(beta), silently); the
    statistics are now float32, and output and gradients follow the float64 formula."""
    torch.manual_seed(0)
    sge = SGE(64, groups=8)
    with torch.no_grad():
        sge.weight.normal_(), sge.bias.normal_()
    x = {"one position": torch.randn(2, 64, 1, 1), "constant": torch.ones(2, 64, 4, 4),
         "spread over 256": torch.randn(2, 64, 8, 8) * 20 + 10}[case].to(dtype)
    x.requires_grad_(True)
    y = sge.to(dtype)(x)
    ref_sge = copy.deepcopy(sge).double()
    x64 = x.detach().double().requires_grad_(True)
    ref = sge_reference(ref_sge, x64)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, sge.weight), g.to(dtype))
    want = torch.autograd.grad(ref, (x64, ref_sge.weight), g)
    tol = 1e-2 if dtype == torch.float16 else 4e-2  # relative, of the norm
    # a constant t's true input gradient is of the order of 1 / eps: past float16's range
    n = 1 if case == "constant" and dtype == torch.float16 else 3
    for a, b in list(zip((y, *got), (ref, *want)))[:n]:
        assert torch.isfinite(a).all()
        assert (a.double() - b).norm() <= tol * b.norm() + 1e-3


@pytest.mark.parametrize("spatial_bn", [True, False], ids=["official-bn", "paper-text"])
def test_cbam_hand_computed(spatial_bn):
    cbam = CBAM(2, reduction=1, spatial_bn=spatial_bn).eval()  # eval BN: (z - 0) / sqrt(1 + eps) * w + b
    with torch.no_grad():
        if spatial_bn:
            cbam.spatial_gate.bn.weight.fill_((1 + cbam.spatial_gate.bn.eps) ** 0.5)  # an identity BN
        cbam.channel_gate.mlp[0].weight.copy_(torch.eye(2))
        cbam.channel_gate.mlp[2].weight.copy_(torch.eye(2))
        w = torch.zeros(1, 2, 7, 7)
        w[0, 0, 3, 3], w[0, 1, 3, 3] = 1.0, 2.0  # centre taps: 1*max + 2*mean
        cbam.spatial_gate.conv.weight.copy_(w)
    x = torch.tensor([[[[1.0, 3.0]], [[-2.0, 0.0]]]])
    # channel: avg [2,-1], max [3,0] -> relu -> [2,0]+[3,0] -> sigmoid [s5, 0.5]
    s5 = sig(5.0)
    x1 = [[1 * s5, 3 * s5], [-1.0, 0.0]]
    logits = [max(x1[0][i], x1[1][i]) + 2 * (x1[0][i] + x1[1][i]) / 2 for i in range(2)]
    expected = torch.tensor([[[[x1[c][i] * sig(logits[i]) for i in range(2)]] for c in range(2)]])
    torch.testing.assert_close(cbam(x), expected)


def test_cbam_is_the_official_structure():
    """As the official code (Jongchan/attention-module, BasicConv(2, 1, 7, relu=False)): a 7x7
    conv without bias, then BatchNorm2d(1, eps 1e-5, momentum 0.01), scale and shift 0 at init
    (also inside a backbone, whose own init sets BN scales to 1), so every spatial gate starts at
    0.5; the shared MLP without biases (our choice: the paper's parameter count)."""
    cbam = CBAM(64)
    conv, bn = cbam.spatial_gate.conv, cbam.spatial_gate.bn
    assert conv.weight.shape == (1, 2, 7, 7) and conv.bias is None and conv.padding == (3, 3)
    assert isinstance(bn, torch.nn.BatchNorm2d) and bn.num_features == 1
    assert bn.eps == 1e-5 and bn.momentum == 0.01 and bn.affine
    assert [isinstance(m, torch.nn.BatchNorm2d) for m in cbam.modules()].count(True) == 1
    assert all(getattr(m, "bias", None) is None for m in cbam.channel_gate.modules()
               if isinstance(m, torch.nn.Linear))
    model = lgam.create_model("resnet18_cbam", num_classes=5)
    for block in (model.layer1[0], model.layer4[1]):
        gate = block.attention.spatial_gate
        assert float(gate.bn.weight.detach()) == 0.0 and float(gate.bn.bias.detach()) == 0.0
        assert gate.conv.weight.detach().abs().sum() > 0  # the conv keeps the backbone's Kaiming init
    x = torch.randn(3, 64, 9, 9)
    for mode in (model.train, model.eval):
        mode()
        torch.testing.assert_close(model.layer1[0].attention.spatial_gate(x), torch.full((3, 1, 9, 9), 0.5))
    assert not hasattr(CBAM(64, spatial_bn=False).spatial_gate.bn, "weight")  # the paper-text gate
    assert sum(p.numel() for p in cbam.parameters()) == 2 * 64 * 4 + 2 * 49 + 2  # MLP, conv, BN


def test_se_matches_its_definition():
    se = SE(32, reduction=16)
    x = torch.randn(3, 32, 4, 4)
    w1, w2 = se.fc[0].weight, se.fc[2].weight
    expected = x * torch.sigmoid(torch.relu(x.mean((2, 3)) @ w1.T) @ w2.T)[..., None, None]
    torch.testing.assert_close(se(x), expected)
    assert sum(p.numel() for p in se.parameters()) == 2 * 32 * 2


def _bam_by_hand() -> BAM:
    """BAM(2, r=1) in eval mode with identity weights, exact-identity BNs and zero biases, so that
    ``Mc = ReLU(GAP(x))`` and ``Ms = ReLU(x_0) + 2 ReLU(x_1)`` at each position."""
    bam = BAM(2, reduction=1).eval()
    with torch.no_grad():
        for m in bam.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_var.fill_(1 - m.eps)  # (x - 0) / sqrt(1 - eps + eps) = x
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.bias.zero_()
                m.weight.zero_()
                if m.weight.shape[0] == 2:  # identity (the 3x3 convs: centre tap only)
                    for c in range(2):
                        m.weight[(c, c) + (m.weight.dim() - 2) * (m.weight.shape[-1] // 2,)] = 1.0
        bam.spatial_gate.body[-1].weight.copy_(torch.tensor([1.0, 2.0]).view(1, 2, 1, 1))
    return bam


@pytest.mark.parametrize("combine", ["sum", "product"])
def test_bam_hand_computed(combine):
    bam = _bam_by_hand()
    bam.combine = combine
    x = torch.tensor([[[[1.0, 3.0]], [[-2.0, 0.0]]]])  # (1, 2, 1, 2)
    # Mc = ReLU(GAP) = [2, 0] per channel; Ms = [1 + 0, 3 + 0] per position
    if combine == "sum":  # F + F sigmoid(Mc + Ms)
        expected = [[1 + sig(3), 3 + 3 * sig(5)], [-2 - 2 * sig(1), 0.0]]
    else:  # F + F sigmoid(Mc Ms)
        expected = [[1 + sig(2), 3 + 3 * sig(6)], [-2 - 2 * 0.5, 0.0]]
    torch.testing.assert_close(bam(x), torch.tensor(expected).view(1, 2, 1, 2))


def test_bam_uses_two_dilated_convs():
    convs = [m for m in BAM(64).spatial_gate.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (3, 3), (1, 1)]
    assert [c.dilation for c in convs[1:3]] == [(4, 4), (4, 4)]
    assert convs[-1].out_channels == 1


@pytest.mark.parametrize("name", ["se", "sge", "cbam", "bam", "lgam", "lgam_g32"])
def test_modules_keep_shape_and_take_channels_last(name):
    m = create_attention(name, 64).eval()
    x = torch.randn(2, 64, 7, 5)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(m(x.to(memory_format=torch.channels_last)), y)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["se", "sge", "cbam", "bam", "lgam", "lgam_g32"])
def test_an_empty_batch_gives_an_empty_batch(name, train):
    """Zero images in, zero out, in either mode, as torch's own layers do (LGAM in train mode
    failed on an ambiguous reshape)."""
    m = create_attention(name, 64).train(train)
    x = torch.randn(0, 64, 7, 5, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("name", ["se", "sge", "cbam", "bam", "lgam"])
def test_every_module_trains(name):
    """A conv + attention + linear head fits a tiny random batch: the module passes gradients."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3, padding=1), create_attention(name, 64),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 4),
    )
    y = torch.arange(16) % 4
    x = torch.randn(16, 3, 8, 8) + y.view(16, 1, 1, 1) * 0.5  # learnable: class shifts the mean
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    att = net[1]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in att.parameters())


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: LGAM(10, groups=4), "not divisible by groups=4"),
        (lambda: SGE(64, eps=0.0), "SGE: eps must be positive"),  # a constant group gave 0 / 0
        (lambda: LGAM(64)(torch.randn(1, 64, 4, 4)), "LGAM in train mode needs at least 2 images"),
        (lambda: BAM(64)(torch.randn(1, 64, 4, 4)), "BAM in train mode needs at least 2 images"),
        (lambda: CBAM(64)(torch.randn(1, 64, 1, 1)), "CBAM in train mode needs more than one value"),
        (lambda: LGAM(64, groups=0), "groups must be a positive integer"),
        (lambda: LGAM(64, groups=4, reduction=0), "reduction must be a positive integer"),
        (lambda: SE(8, reduction=16), "use reduction <= 8"),
        (lambda: SE(0), "channels must be a positive integer"),
        (lambda: SGE(10, groups=4), "divisors of 10"),
        (lambda: CBAM(4, reduction=8), "reduction=8 is larger"),
        (lambda: CBAM(64, kernel_size=6), "kernel_size must be odd"),
        (lambda: BAM(64, combine="mean"), "combine must be 'sum' or 'product'"),
        (lambda: BAM(8, reduction=16), "reduction=16 is larger"),
        (lambda: create_attention("nope", 64), "unknown attention 'nope'"),
    ],
)
def test_bad_arguments_say_what_to_change(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_lgam_hidden_width_is_at_least_one():
    """The design notes (../shared/DESIGN.md): h = max(1, C'/r); a reduction wider than a group
    was refused."""
    m = LGAM(64, groups=8, reduction=16)  # C' = 8
    assert [ca.mlp[0].out_features for ca in m.channel_attention] == [1] * 8
    assert LGAM(64, groups=4, reduction=8).channel_attention[0].mlp[0].out_features == 2
    assert LGAM(64).eval()(torch.randn(1, 64, 4, 4)).shape == (1, 64, 4, 4)  # one image, eval mode


def test_an_unknown_lgam_fused_value_is_said_not_silently_ignored():
    from lgam.attention.lgam.dispatch import _env_setting

    assert (_env_setting("0"), _env_setting(" 1 "), _env_setting("")) == (False, True, None)
    with pytest.warns(UserWarning, match="LGAM_FUSED='on' is not 0 or 1: ignored"):
        assert _env_setting("on") is None


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("channels,groups,size", [(16, 4, (3, 4)), (8, 8, (2, 3)), (64, 64, (5, 5)), (8, 2, (1, 1))])
def test_sge_matches_its_formula_in_float64(channels, groups, size, channels_last):
    """The hand-written backward against autograd through sge_reference: outputs and the
    gradients of input, gamma and beta to float64 accuracy, in either memory format."""
    torch.manual_seed(0)
    sge = SGE(channels, groups).double()
    with torch.no_grad():
        sge.weight.normal_(), sge.bias.normal_()
    x = torch.randn(2, channels, *size, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y, ref = sge(x), sge_reference(sge, x)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, sge.weight, sge.bias), g)
    want = torch.autograd.grad(ref, (x, sge.weight, sge.bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sge_gradcheck_and_bf16():
    torch.manual_seed(0)
    sge = SGE(16, groups=4).double()
    with torch.no_grad():
        sge.weight.normal_(), sge.bias.normal_()
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sge, (x,))
    x = torch.randn(2, 16, 6, 6)
    with torch.autocast(torch.get_default_device().type, dtype=torch.bfloat16):
        y = sge.float()(x.bfloat16().to(memory_format=torch.channels_last))
    assert y.dtype == torch.bfloat16
    ref = sge_reference(sge, x)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("module,name", [(lambda: SE(64), "SE"), (lambda: SGE(64, groups=8), "SGE"),
                                          (lambda: CBAM(64), "CBAM"), (lambda: BAM(64), "BAM"),
                                          (lambda: LGAM(64, groups=4), "LGAM")])
@pytest.mark.parametrize("shape", [(2, 32, 6, 5), (64, 6, 5), (2, 64, 6), (2, 36, 4, 4)])
def test_every_module_names_the_input_shape_it_expects(module, name, shape):
    """SE and CBAM failed inside a matmul or an index, SGE ran on 32 of its 64 channels."""
    with pytest.raises(ValueError, match=re.escape(f"{name} expects (B, 64, H, W) input, got {shape}")):
        module()(torch.randn(shape))


@pytest.mark.parametrize("build", [lambda n: SE(n), lambda n: SGE(n, groups=8), lambda n: CBAM(n),
                                   lambda n: BAM(n), lambda n: LGAM(n), lambda n: lgam.create_model(
                                       "resnet18", num_classes=n)], ids=["SE", "SGE", "CBAM", "BAM", "LGAM", "model"])
def test_numpy_integers_are_sizes_and_floats_are_not(build):
    """As nn.Linear takes them; the error once said 'must be a positive integer, got np.int64(64)'."""
    assert sum(p.numel() for p in build(np.int64(64)).parameters()) == sum(
        p.numel() for p in build(64).parameters())
    with pytest.raises(ValueError, match="must be (a positive integer|an integer >= 0), got 64.0"):
        build(64.0)
