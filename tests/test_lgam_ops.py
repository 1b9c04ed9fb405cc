"""LGAM's op (``torch.ops.lgam.lgam``, the C++ kernels) against the loop transcription of eqs
(1)-(7), the residual block's tail it fuses, the op's registration (``opcheck``), its checked
boundary, ``torch.compile`` and when it is taken. The oracle tests shared with the equations'
path are in ``test_lgam_module.py`` (``lgam_path``)."""
import copy

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.library import opcheck

from lgam import create_model
from lgam.attention import (LGAM, capture_gates, fused_kernels, fused_kernels_enabled, fused_kernels_setting,
                            fuses_residual, set_fused_kernels)
from lgam.attention.lgam import dispatch, kernels, lgam_reference
from test_lgam_module import _module, _rel


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _grads(module, fn, x, identity, g):
    """Output, and gradients of ``sum(out * g)`` for ``x``, ``identity`` and the parameters."""
    x, identity = x.clone().requires_grad_(True), identity.clone().requires_grad_(True)
    y = fn(module, x, identity)
    (y * g).sum().backward()
    return y, x.grad, identity.grad, torch.cat([p.grad.flatten() for p in module.parameters()])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("groups, channels, side, layout", [
    (1, 128, 5, "cl"), (4, 128, 5, "cl"), (4, 128, 5, "nchw"), (32, 128, 6, "cl"),  # vectors, tails
    (4, 24, 7, "cl"), (2, 24, 4, "nchw"),  # groups narrower than a vector: the scalar code
])
def test_the_block_tail_matches_the_oracle_in_float64(fused, groups, channels, side, layout, train):
    """``LGAM(x, residual=identity)`` is ``ReLU(A'' + identity)`` to float64 accuracy: output and
    the gradients of ``x``, ``identity`` and every parameter, and the BN running statistics."""
    torch.manual_seed(groups)
    # reduction 2: a hidden layer of one unit dies for a whole batch of 3 often enough that BN
    # then normalises a constant, sitting on ReLU's kink (either side is a valid gradient)
    fast = LGAM(channels, groups=groups, reduction=1 if groups == 32 else 2).double().train(train)
    loop = copy.deepcopy(fast)
    x, identity, g = (torch.randn(3, channels, side, side, dtype=torch.float64) for _ in range(3))
    to_layout = _cl if layout == "cl" else torch.Tensor.contiguous
    assert fused_kernels_enabled(fast, to_layout(x))
    yf, gxf, gif, gpf = _grads(fast, lambda m, t, i: m(to_layout(t), residual=to_layout(i)), x, identity, g)
    yl, gxl, gil, gpl = _grads(loop, lambda m, t, i: torch.relu(lgam_reference(m, t) + i), x, identity, g)
    assert yf.is_contiguous(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)
    assert (yf == 0).any() and (yf > 0).any()  # the ReLU is exercised
    for got, want in ((yf, yl), (gxf, gxl), (gif, gil), (gpf, gpl)):
        assert _rel(got, want) <= 1e-12
    for a, b in zip(fast.buffers(), loop.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["cl", "nchw"])
def test_fused_gradcheck_with_and_without_the_block_tail(fused, layout):
    torch.manual_seed(0)
    m = LGAM(16, groups=4, reduction=2).double().train()
    to_layout = _cl if layout == "cl" else torch.Tensor.contiguous
    x = to_layout(torch.randn(3, 16, 4, 5, dtype=torch.float64)).requires_grad_(True)
    identity = to_layout(torch.randn(3, 16, 4, 5, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(m, (x,))
    assert torch.autograd.gradcheck(lambda a, i: m(a, residual=i), (x, identity))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eval_mode_gives_the_same_values_with_and_without_autograd(fused, dtype):
    """Eval mode (BN on its running statistics): the op's values are the same with autograd on
    and off (Grad-CAM runs one of each), its gradients pass gradcheck, and new weights (an
    optimiser step, a loaded state) are picked up."""
    m = _module(8, train=False).to(dtype)
    x = torch.randn(3, 128, 5, 5, dtype=dtype)
    with torch.no_grad():
        fast = m(x)
    assert torch.equal(fast, m(x.clone().requires_grad_(True)))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert _rel(fast, lgam_reference(copy.deepcopy(m).double(), x.double())) <= tol
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(m, (x[:2, :, :2, :2].clone().requires_grad_(True),))
    with torch.no_grad():
        m.channel_attention[0].bn.bias.add_(1.0)
        assert not torch.equal(m(x), fast)
        m.load_state_dict(_module(8, train=False).to(dtype).state_dict())
        assert torch.equal(m(x), fast)


def _op_args(train: bool, dtype: torch.dtype, layout: str, tail: bool, requires_grad: bool = True) -> tuple:
    """Arguments of ``lgam::lgam`` for a small module (24 channels, G=4: groups narrower than a
    vector; batch 3) with float32 weights (float64 for float64 maps)."""
    torch.manual_seed(0)
    m = LGAM(24, groups=4, reduction=1).to(torch.float64 if dtype == torch.float64 else torch.float32)
    to_layout = _cl if layout == "cl" else torch.Tensor.contiguous
    x = to_layout(torch.randn(3, 24, 4, 5).to(dtype)).requires_grad_(requires_grad)
    identity = to_layout(torch.randn(3, 24, 4, 5).to(dtype)) if tail else None
    return (x, identity, *m._group_tensors(), 4, train, 1e-5, 0.1)


@pytest.mark.parametrize("tail", [False, True], ids=["", "tail"])
@pytest.mark.parametrize("layout", ["cl", "nchw"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", list(kernels.KERNEL_DTYPES))
def test_opcheck_the_op(fused, dtype, train, layout, tail):
    """``torch.library.opcheck`` (schema, fake tensors, autograd registration, AOT dispatch) of
    ``lgam::lgam`` for every map dtype it takes, both layouts, with and without the block tail."""
    opcheck(torch.ops.lgam.lgam.default, _op_args(train, dtype, layout, tail))


@pytest.mark.parametrize("tail", [False, True], ids=["", "tail"])
@pytest.mark.parametrize("dtype", list(kernels.KERNEL_DTYPES))
def test_opcheck_the_backward_op(fused, dtype, tail):
    """The same for ``lgam::lgam_backward`` (which has no backward itself: no double backward)."""
    args = _op_args(True, dtype, "cl", tail, requires_grad=False)
    x, identity, params, stats, groups = args[:5]
    params = [t.detach() for t in params]
    with torch.no_grad():
        out, s, scales, p, q, v, saved, _ = torch.ops.lgam.lgam(*args)
    grad = torch.randn_like(out)
    opcheck(torch.ops.lgam.lgam_backward.default,
            (grad, x, out if tail else None, s, scales, p, q, v, params, saved, groups, True))


def test_the_boundary_refuses_what_the_kernels_cannot_read(fused):
    """Every pointer into the C++ code is checked first: a wrong dtype, shape, device or layout,
    or a wrong number of weights, is a ValueError naming the argument; an unchecked pointer or a
    wrong argument count a TypeError; nothing reaches the kernels."""
    x, identity, params, stats = _op_args(False, torch.float32, "cl", False, requires_grad=False)[:4]
    op = torch.ops.lgam.lgam
    with pytest.raises(ValueError, match=r"params\[0\] is torch.float64, expected torch.float32"):
        op(x, None, [params[0].double()] + params[1:], stats, 4, False, 1e-5, 0.1)
    with pytest.raises(ValueError, match=r"params\[2\] has shape \(5, 6\), expected \(6, 6\)"):
        op(x, None, params[:2] + [params[2][:5]] + params[3:], stats, 4, False, 1e-5, 0.1)
    with pytest.raises(ValueError, match="params: 23 tensors, expected 24"):
        op(x, None, params[:-1], stats, 4, False, 1e-5, 0.1)
    with pytest.raises(ValueError, match=r"stats\[1\] is not dense"):
        op(x, None, params, [stats[0], torch.randn(12)[::2]] + stats[2:], 4, False, 1e-5, 0.1)
    with pytest.raises(ValueError, match=r"not torch\.float16$"):  # "bfloat16" also says float16
        op(x.half(), None, params, stats, 4, False, 1e-5, 0.1)
    with pytest.raises(ValueError, match="is on meta, not the CPU"):
        kernels.arg("x", x.to("meta"), torch.float32, x.shape)
    with pytest.raises(TypeError, match="must be a checked tensor"):
        kernels.call("mean", torch.float32, x, x, 3, 24, 20, 1)
    with pytest.raises(TypeError, match="5 arguments, expected 6"):
        kernels.call("mean", torch.float32, None, None, 3, 24, 20)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_compiled_resnet18_lgam_runs_the_op_without_graph_breaks(fused, train):
    """``torch.compile(model, fullgraph=True)`` of resnet18_lgam: no graph break (fullgraph
    raises at one), the compiled graph calls ``lgam::lgam`` (and its backward), and the compiled
    model gives the eager one's outputs, gradients and BN statistics."""
    torch.manual_seed(0)
    model = create_model("resnet18_lgam", num_classes=10).train(train)
    compiled_model = copy.deepcopy(model)
    x = _cl(torch.randn(2, 3, 64, 64))
    graphs = []
    backend = aot_autograd(fw_compiler=_record(graphs), bw_compiler=_record(graphs))
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    y, yc = model(x), compiled(x)
    y.square().sum().backward()
    yc.square().sum().backward()
    assert torch.equal(y, yc)
    for a, b in zip(model.parameters(), compiled_model.parameters()):
        assert torch.equal(a.grad, b.grad)
    for a, b in zip(model.buffers(), compiled_model.buffers()):
        assert torch.equal(a, b)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert targets.count("lgam.lgam.default") == 8 and targets.count("lgam.lgam_backward.default") == 8


def test_with_the_kernels_off_a_compiled_model_runs_the_equations():
    """``set_fused_kernels(False)``: the equations, traced whole (``fullgraph=True``), no op in
    the graph, the eager model's output."""
    set_fused_kernels(False)
    torch.manual_seed(0)
    model = create_model("resnet18_lgam", num_classes=10).eval()
    graphs = []
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True,
                             backend=aot_autograd(fw_compiler=_record(graphs), bw_compiler=_record(graphs)))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(compiled(x), model(x))
    assert graphs and not any("lgam" in str(n.target) for g in graphs for n in g.graph.nodes)


def test_flop_counter_counts_the_op_as_the_equations(fused):
    """``FlopCounterMode`` sees the group MLPs inside the op, forward and backward, as it does on
    the equations' path (the op hid them: resnet18_lgam counted as plain's 1.8136 GMACs)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model("resnet18_lgam", num_classes=20)
    counters = []
    for enabled in (True, False):
        set_fused_kernels(enabled)
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(2, 3, 32, 32)).sum().backward()
        counters.append(counter)
    op_counts = counters[0].get_flop_counts()["Global"]
    assert op_counts[torch.ops.lgam.lgam] > 0 and op_counts[torch.ops.lgam.lgam_backward] > 0
    assert counters[0].get_total_flops() == counters[1].get_total_flops()


def test_torch_export_sees_the_op(fused):
    """``torch.export`` of an LGAM module records ``lgam::lgam``, and the exported program
    computes what the module does."""
    m = LGAM(32, groups=4, reduction=2).eval()
    x = _cl(torch.randn(2, 32, 6, 6))
    exported = torch.export.export(m, (x,))
    assert "lgam.lgam.default" in [str(n.target) for n in exported.graph.nodes]
    assert torch.equal(exported.module()(x), m(x))


@pytest.mark.slow
def test_inductor_compiles_around_the_op(fused):
    """The default backend (Inductor generating code for everything around the op) in train
    mode, forward and backward: the eager module's output, input gradient and statistics."""
    torch.manual_seed(0)
    m = LGAM(32, groups=4, reduction=2).train()
    c = copy.deepcopy(m)
    x = _cl(torch.randn(3, 32, 6, 6))
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, yc = m(a), torch.compile(c, fullgraph=True)(b)
    y.square().sum().backward()
    yc.square().sum().backward()
    torch.testing.assert_close(yc, y)
    torch.testing.assert_close(b.grad, a.grad)
    for u, v in zip(m.buffers(), c.buffers()):
        torch.testing.assert_close(u, v)


def _record(graphs):
    def compiler(gm, inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)
    return compiler


def test_odd_strides_and_unsupported_dtypes(fused):
    """A map that is neither channels_last nor contiguous is copied first; float16 (no kernel)
    takes the equations; either way the result is the module's."""
    m = LGAM(32, groups=4, reduction=2).eval()
    x = torch.randn(2, 32, 8, 10)[..., ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    assert fused_kernels_enabled(m, x)
    torch.testing.assert_close(m(x), lgam_reference(m, x), rtol=1e-5, atol=1e-5)
    assert not fused_kernels_enabled(m, x.half())
    ref = lgam_reference(m, x)
    half = m.half()(x.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref, rtol=2e-2, atol=2e-2)  # float16's 11-bit mantissa


def test_the_blocks_hand_their_identity_to_lgam():
    """resnet18_lgam's blocks let LGAM add the identity (and ReLU) itself; other modules don't."""
    lgam_block = create_model("resnet18_lgam", num_classes=4).layer1[0]
    se_block = create_model("resnet18_se", num_classes=4).layer1[0]
    assert fuses_residual(lgam_block.attention) and not fuses_residual(se_block.attention)
    seen = []
    lgam_block.attention.register_forward_hook(lambda m, a, kw, out: seen.append(kw), with_kwargs=True)
    lgam_block(torch.randn(2, 64, 8, 8))
    assert seen[0]["residual"].shape == (2, 64, 8, 8)

@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("where", ["input, vector part", "input, leftover part", "weight"])
def test_a_nan_is_a_nan_on_both_paths(fused, where, train):
    """The kernels' vectorised gate sent NaN to 0.5 (``s > 0 ? -s : 0``) and their ReLUs to 0:
    a diverged model trained on with finite outputs on the CPU, and gave NaN on a GPU (the
    equations). The same NaNs, forward and backward, as the equations give."""
    torch.manual_seed(0)
    m = LGAM(64, groups=4, reduction=2).train(train)
    x = torch.randn(2, 64, 4, 5)  # 20 positions: 16 in vectors of float, 4 left over
    if where == "weight":
        with torch.no_grad():
            m.channel_attention[1].mlp[2].weight[3, 0] = float("nan")
    else:
        x[0, 7, *divmod(3 if where == "input, vector part" else 18, 5)] = float("nan")
    out = {}
    for path in (True, False):
        module, xin = copy.deepcopy(m), _cl(x).clone().requires_grad_(True)
        with fused_kernels(path):
            y = module(xin, residual=_cl(x))
            y.sum().backward()
        out[path] = y.detach(), xin.grad
    for (a, b), what in zip(zip(out[True], out[False]), ("output", "input gradient")):
        assert torch.equal(a.isnan(), b.isnan()), (what, int(a.isnan().sum()), int(b.isnan().sum()))
    assert out[True][0].isnan().any()



@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_network_is_as_accurate_on_both_paths(fused, train):
    """resnet18_lgam in float32, fused and eager, against itself in float64: the logits and
    every parameter gradient as accurate on either path (the network amplifies float32's
    rounding to ~1e-5 on both)."""
    torch.manual_seed(0)
    model = create_model("resnet18_lgam", num_classes=20).train(train)
    x = _cl(torch.randn(4, 3, 64, 64))
    out = {}
    for path, dtype in ((True, torch.float64), (True, torch.float32), (False, torch.float32)):
        net = copy.deepcopy(model).to(dtype)
        with fused_kernels(path):
            y = net(x.to(dtype))
            y.square().sum().backward()
        out[path, dtype] = (y, torch.cat([p.grad.flatten() for p in net.parameters()]))
    exact = out[True, torch.float64]
    for i in range(2):
        fused_err, eager_err = (_rel(out[p, torch.float32][i], exact[i]) for p in (True, False))
        assert fused_err <= 2 * eager_err + 1e-6, (i, fused_err, eager_err)


def test_a_bf16_network_records_exact_gates(fused):
    """resnet18_lgam (BatchNorm statistics of three random batches) in bf16 autocast +
    channels_last on the op: each module's recorded spatial gate is that of eqs (5)-(6) in
    float64 on the bf16 input it got (S is summed in float32 from bf16 values, where a bf16 S
    would be ~1e-2 off). (The bf16 network itself drifts from float32 by its convolutions'
    rounding, 0.2 in its logits here on either path; test_lgam_module bounds LGAM's share.)"""
    torch.manual_seed(0)
    model = create_model("resnet18_lgam", num_classes=20)
    for bn in model.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.momentum = None
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 64, 64))
    model = model.eval().to(memory_format=torch.channels_last)
    x = _cl(torch.randn(4, 3, 64, 64))
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: inputs.update({name: args[0]}) and None)
             for name, m in model.named_modules() if isinstance(m, LGAM)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), capture_gates(model) as gates:
        y = model(x).float()
    for hook in hooks:
        hook.remove()
    assert torch.isfinite(y).all() and len(gates) == 8
    for name, gate in gates.items():
        module = copy.deepcopy(model.get_submodule(name)).double()
        _, ladder = lgam_reference(module, inputs[name].double(), return_ladder=True)
        exact = torch.sigmoid(torch.relu(torch.cat(ladder, 1).sum(1, keepdim=True)))  # eqs (5)-(6)
        assert (gate["spatial"].double() - exact).abs().max().item() <= 1e-4, name


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_which_input_takes_the_fused_path():
    x = torch.randn(2, 32, 4, 4)
    m, g32 = LGAM(32, groups=4, reduction=2), LGAM(32, groups=32, reduction=1)
    ready = kernels.kernel_missing() is None
    assert fused_kernels_enabled(m, _cl(x)) == fused_kernels_enabled(g32, x) == ready  # auto: any G
    assert fused_kernels_enabled(m, x.bfloat16()) == fused_kernels_enabled(copy.deepcopy(m).double(), x.double()) == ready
    assert not fused_kernels_enabled(m, x.double())  # float32 weights, a float64 map: the equations
    assert not fused_kernels_enabled(m, x.half()) and not fused_kernels_enabled(m, x.to("meta"))
    set_fused_kernels(False)
    assert not fused_kernels_enabled(m, _cl(x)) and fused_kernels_setting() == "off"
    with pytest.raises(ValueError, match="True, False or None"):
        set_fused_kernels("yes")
    with fused_kernels(None):
        assert fused_kernels_setting() == ("auto" if ready else f"auto (eager here: {kernels.kernel_missing()})")
        assert fused_kernels_setting("meta") == "auto (eager here: no LGAM kernels for meta)"
    assert fused_kernels_setting() == "off"
    with torch.jit.optimized_execution(False):
        set_fused_kernels(None)
        traced = torch.jit.trace(m.eval(), x)  # tracing records the equations' ops
    torch.testing.assert_close(traced(x), m(x), rtol=1e-5, atol=1e-6)


def test_kernels_that_cannot_be_built(monkeypatch):
    """No compiler or a failed build: auto mode takes the equations, and the setting says why;
    forced on, the failure is raised, saying why."""
    m = LGAM(16, groups=4, reduction=2).eval()
    x = _cl(torch.randn(2, 16, 4, 4))
    monkeypatch.setattr(kernels, "library", lambda: "RuntimeError: g++ failed: boom")
    monkeypatch.setattr(dispatch, "_kernels_missing", lambda: "RuntimeError: g++ failed: boom")
    assert not fused_kernels_enabled(m, x)
    assert fused_kernels_setting() == "auto (eager here: RuntimeError: g++ failed: boom)"
    torch.testing.assert_close(m(x), lgam_reference(m, x), rtol=1e-5, atol=1e-5)
    set_fused_kernels(True)
    with pytest.raises(RuntimeError, match="cannot run here: RuntimeError: g\\+\\+ failed: boom"):
        m(x)


def test_the_kernels_build_once_into_the_cache(monkeypatch, tmp_path):
    """A fresh cache: one build (a shared library named by the source, flags, compiler and CPU),
    then reused; a compiler that is not there is reported by name."""
    monkeypatch.setenv("LGAM_KERNEL_CACHE", str(tmp_path))
    if kernels.kernel_missing() is not None:
        pytest.skip(f"LGAM's CPU kernels cannot be built here: {kernels.kernel_missing()}")
    compiler = kernels.shutil.which("g++")
    built = kernels.build(compiler)
    assert built.parent == tmp_path and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    assert kernels.build(compiler) == built and built.stat().st_mtime_ns == stamp
    assert list(tmp_path.iterdir()) == [built]  # nothing left of the build
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    kernels.library.cache_clear()
    try:
        assert kernels.kernel_missing() == "no C++ compiler (no-such-compiler-here) on PATH"
    finally:
        monkeypatch.delenv("CXX")
        kernels.library.cache_clear()


def test_the_layout_the_languages_share_is_compiled_in():
    """Where each group tensor and saved intermediate sits is written once (``PARAMS``,
    ``STATS``, ``SAVED``) and reaches the C++ source as -D flags; the module hands the op the
    tensors those attribute paths name, group by group."""
    assert {"-DLGAM_PARAMS=6", "-DLGAM_PARAM_GAMMA=4", "-DLGAM_STAT_VAR=1", "-DLGAM_SAVED_BN=4"} <= set(kernels.FLAGS)
    m = LGAM(32, groups=4, reduction=2)
    named = dict(m.named_parameters()) | dict(m.named_buffers())
    for got, names in zip(m._group_tensors(), (kernels.PARAMS, kernels.STATS), strict=True):
        want = [named[f"channel_attention.{k}.{path}"] for k in range(4) for path, _ in names.values()]
        assert all(a is b for a, b in zip(got, want, strict=True))


def test_batchnorms_frozen_on_their_own_keep_their_statistics(fused):
    """A train-mode module whose BatchNorms were put in eval mode (frozen statistics) normalises
    with the running statistics and leaves them alone, as its own ops would."""
    m = _module(4, train=True)
    for a in m.channel_attention:
        a.bn.eval()
    before = [a.bn.running_mean.clone() for a in m.channel_attention]
    x = torch.randn(3, 128, 5, 5)
    y = m(x)
    assert all(torch.equal(a.bn.running_mean, b) for a, b in zip(m.channel_attention, before))
    torch.testing.assert_close(y, lgam_reference(m, x), rtol=1e-5, atol=1e-5)
