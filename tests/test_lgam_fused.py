"""LGAM's fused path (the CPU kernels, the GPU's Triton kernels run interpreted on CPU tensors,
and the formulation a compiled model inlines) against the loop transcription of eqs (1)-(7), the
residual block's tail it fuses, and when it is taken. The oracle tests shared with the eager path
are in ``test_lgam_module.py`` (``lgam_path``)."""
import copy
import os
import pickle
import subprocess
import sys

import pytest
import torch

from lgam import create_model
from lgam.attention import (LGAM, capture_gates, fused_kernels, fused_kernels_enabled, fused_kernels_setting,
                            fuses_residual, set_fused_kernels)
from lgam.attention import _lgam_fused, _lgam_kernel
from lgam.attention.lgam import lgam_reference
from _helpers import REPO
from test_lgam_module import _module, _rel


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


@pytest.fixture(params=["cpp", pytest.param("triton", marks=pytest.mark.slow)])  # interpreted: slow
def kernels(request) -> str:
    """The test once per set of kernels: the CPU's (``fused``) and the GPU's (``triton_kernels``:
    Triton's, interpreted on CPU tensors)."""
    request.getfixturevalue("fused" if request.param == "cpp" else "triton_kernels")
    return request.param


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
def test_the_block_tail_matches_the_oracle_in_float64(kernels, groups, channels, side, layout, train):
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
    """(The Triton kernels' gradients are checked against the float64 oracle's only: gradcheck's
    thousands of calls take minutes in Triton's interpreter.)"""
    torch.manual_seed(0)
    m = LGAM(16, groups=4, reduction=2).double().train()
    to_layout = _cl if layout == "cl" else torch.Tensor.contiguous
    x = to_layout(torch.randn(3, 16, 4, 5, dtype=torch.float64)).requires_grad_(True)
    identity = to_layout(torch.randn(3, 16, 4, 5, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(m, (x,))
    assert torch.autograd.gradcheck(lambda a, i: m(a, residual=i), (x, identity))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eval_mode_takes_the_scales_from_one_kernel_call(kernels, dtype):
    """Eval mode: eqs (2)-(4) and the ladder weights come from the kernel (BN with its running
    statistics), the same values with autograd on and off (Grad-CAM runs one of each), and the
    gradients from the module's own ops."""
    m = _module(8, train=False).to(dtype)
    x = torch.randn(3, 128, 5, 5, dtype=dtype)
    with torch.no_grad():
        fast = m(x)
    assert m in _lgam_kernel._WEIGHT_POINTERS  # the kernel's path, cached pointers
    with_grad = m(x.clone().requires_grad_(True))
    assert torch.equal(fast, with_grad)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert _rel(fast, lgam_reference(copy.deepcopy(m).double(), x.double())) <= tol
    if dtype == torch.float64 and kernels == "cpp":  # gradcheck: minutes in Triton's interpreter
        assert torch.autograd.gradcheck(m, (x[:2, :, :2, :2].clone().requires_grad_(True),))
    y = m(x.clone().requires_grad_(True))
    m.train()  # a backward after switching modes would run BN on other statistics: refused
    with pytest.raises(RuntimeError, match="train mode between"):
        y.sum().backward()
    pickle.dumps(m), copy.deepcopy(m)  # the pointer cache stays off the module


def test_inference_weights_follow_the_module(kernels):
    """New weights (an optimiser step, a loaded state) are picked up; weights in another dtype
    than the work dtype fall back to the autograd route."""
    m = _module(4, train=False)
    p = torch.randn(2, 128)
    before = _lgam_kernel.scales_kernel(m, p)
    with torch.no_grad():
        m.channel_attention[0].bn.bias.add_(1.0)
    after = _lgam_kernel.scales_kernel(m, p)
    assert not torch.equal(before[0], after[0])
    m.load_state_dict(_module(4, train=False).state_dict())
    torch.testing.assert_close(_lgam_kernel.scales_kernel(m, p)[0], before[0])
    assert _lgam_kernel.scales_kernel(copy.deepcopy(m).bfloat16(), p) is None


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


def test_fused_network_in_bf16_agrees_with_eager_and_records_gates(fused):
    """resnet18_lgam (BatchNorm statistics of three random batches) in bf16 autocast +
    channels_last: the fused path's logits within 2e-2 of float32, as close as the eager path's,
    and spatial gates recorded as close to float32's as the eager path's."""
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

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), capture_gates(model) as gates:
            return model(x).float(), gates

    y_fused, gates_fused = run()
    set_fused_kernels(False)
    y_eager, gates_eager = run()
    with torch.no_grad(), capture_gates(model) as gates_ref:
        ref = model(x.contiguous())  # float32, eager
    assert _rel(y_fused, ref) <= max(2e-2, 1.5 * _rel(y_eager, ref))
    assert torch.equal(y_fused.argmax(1), ref.argmax(1))
    assert gates_fused.keys() == gates_eager.keys() and len(gates_fused) == 8
    for name, gate in gates_ref.items():
        err_fused, err_eager = ((g[name]["spatial"] - gate["spatial"]).abs().mean().item()
                                for g in (gates_fused, gates_eager))
        assert err_fused <= 1.5 * err_eager + 1e-3, (name, err_fused, err_eager)


def test_odd_strides_and_unsupported_dtypes(fused):
    """A map that is neither channels_last nor contiguous is copied first; float16 (no kernel)
    takes the eager path; either way the result is the module's."""
    m = LGAM(32, groups=4, reduction=2).eval()
    x = torch.randn(2, 32, 8, 10)[..., ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    assert fused_kernels_enabled(m, x)
    torch.testing.assert_close(m(x), m.forward_eager(x)[0], rtol=1e-5, atol=1e-5)
    assert not fused_kernels_enabled(m, x.half())
    assert m.half()(x.half()).dtype == torch.float16


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_which_input_takes_the_fused_path():
    x = torch.randn(2, 32, 4, 4)
    m, g32 = LGAM(32, groups=4, reduction=2), LGAM(32, groups=32, reduction=1)
    ready = _lgam_kernel.kernel_missing() is None
    assert fused_kernels_enabled(m, _cl(x)) == fused_kernels_enabled(g32, x) == ready  # auto: any G
    assert fused_kernels_enabled(m, x.bfloat16()) == fused_kernels_enabled(m, x.double()) == ready
    assert not fused_kernels_enabled(m, x.half()) and not fused_kernels_enabled(m, x.to("meta"))
    set_fused_kernels(False)
    assert not fused_kernels_enabled(m, _cl(x)) and fused_kernels_setting() == "off"
    with pytest.raises(ValueError, match="True, False or None"):
        set_fused_kernels("yes")
    with fused_kernels(None):
        assert fused_kernels_setting() == ("auto" if ready else f"auto (eager here: {_lgam_kernel.kernel_missing()})")
        assert fused_kernels_setting("meta") == "auto (eager here: no LGAM kernels for meta)"
    assert fused_kernels_setting() == "off"
    with torch.jit.optimized_execution(False):
        set_fused_kernels(None)
        traced = torch.jit.trace(m.eval(), x)  # tracing records the eager path's ops
    torch.testing.assert_close(traced(x), m(x), rtol=1e-5, atol=1e-6)


def test_kernels_that_cannot_be_built(monkeypatch):
    """No compiler: auto mode stays eager without a word; a failed build: one warning, then the
    eager path; forced on: the failure is raised, saying why."""
    m = LGAM(16, groups=4, reduction=2).eval()
    x = _cl(torch.randn(2, 16, 4, 4))
    monkeypatch.setattr(_lgam_kernel, "_library", lambda: "no C++ compiler (g++) on PATH")
    assert not fused_kernels_enabled(m, x)
    assert fused_kernels_setting() == "auto (eager here: no C++ compiler (g++) on PATH)"
    monkeypatch.setattr(_lgam_kernel, "_library", lambda: "RuntimeError: g++ failed: boom")
    monkeypatch.setattr(_lgam_fused.FUSED, "warned", False)
    with pytest.warns(UserWarning, match="boom"):
        y = m(x)
    torch.testing.assert_close(y, m.forward_eager(x)[0])
    set_fused_kernels(True)
    with pytest.raises(RuntimeError, match="cannot run here: RuntimeError: g\\+\\+ failed: boom"):
        m(x)


def test_the_kernels_build_once_into_the_cache(monkeypatch, tmp_path):
    """A fresh cache: one build (a shared library named by the source, flags, compiler and CPU),
    then reused; a compiler that is not there is reported by name."""
    monkeypatch.setenv("LGAM_KERNEL_CACHE", str(tmp_path))
    if _lgam_kernel.kernel_missing() is not None:
        pytest.skip(f"LGAM's CPU kernels cannot be built here: {_lgam_kernel.kernel_missing()}")
    compiler = _lgam_kernel.shutil.which("g++")
    built = _lgam_kernel._build(compiler)
    assert built.parent == tmp_path and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    assert _lgam_kernel._build(compiler) == built and built.stat().st_mtime_ns == stamp
    assert list(tmp_path.iterdir()) == [built]  # nothing left of the build
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    _lgam_kernel._library.cache_clear()
    try:
        assert _lgam_kernel.kernel_missing() == "no C++ compiler (no-such-compiler-here) on PATH"
    finally:
        monkeypatch.delenv("CXX")
        _lgam_kernel._library.cache_clear()


def test_inside_a_compiled_model_the_fused_formulation_is_inlined(fused):
    """``torch.compile`` of a whole model (``lgam train --compile``) traces the fused
    formulation, block tail included, in place of the kernels: same result as the loop."""
    torch.manual_seed(0)
    m = LGAM(32, groups=4, reduction=2).double().train()
    x = _cl(torch.randn(4, 32, 5, 5, dtype=torch.float64))
    identity = _cl(torch.randn(4, 32, 5, 5, dtype=torch.float64))
    loop = copy.deepcopy(m)
    y = torch.compile(lambda a, i: m(a, residual=i), dynamic=False)(x.clone().requires_grad_(True), identity)
    assert _rel(y, torch.relu(lgam_reference(loop, x) + identity)) <= 1e-12


def test_batchnorms_frozen_on_their_own_keep_their_statistics(kernels):
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["cl", "nchw"])
def test_the_triton_kernels_take_16_bit_maps(triton_kernels, dtype, layout):
    """float16 (CUDA autocast's default) and bfloat16 maps, float32 weights: the output in the
    map's dtype and memory format, within its rounding of eqs (1)-(7) in float64, with the block
    tail; the input gradient as close to float64's as the eager path's."""
    torch.manual_seed(0)
    m = LGAM(64, groups=4, reduction=4).train()
    to_layout = _cl if layout == "cl" else torch.Tensor.contiguous
    x, identity = (to_layout(torch.randn(4, 64, 6, 6).to(dtype)) for _ in range(2))
    assert fused_kernels_enabled(m, x)
    exact = torch.relu(lgam_reference(copy.deepcopy(m).double(), x.double()) + identity.double())
    a = x.clone().requires_grad_(True)
    y = m(a, residual=identity)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)
    assert _rel(y.double(), exact) <= 4e-3
    y.double().square().sum().backward()
    b = x.double().requires_grad_(True)
    torch.relu(lgam_reference(copy.deepcopy(m).double(), b) + identity.double()).square().sum().backward()
    with fused_kernels(False):
        c = x.clone().requires_grad_(True)
        m(c, residual=identity).double().square().sum().backward()
    assert _rel(a.grad.double(), b.grad) <= max(1e-2, 1.5 * _rel(c.grad.double(), b.grad))


@pytest.mark.parametrize("batch", [2, 37])
@pytest.mark.slow
def test_the_triton_train_kernels_take_the_batch_in_chunks(triton_kernels, batch, monkeypatch):
    """Train mode's scales kernels hold the batch in chunks of a few samples (BatchNorm's sums
    over all of them): a batch of several chunks, the last one partial, is as exact as one."""
    from lgam.attention import _lgam_triton

    monkeypatch.setattr(_lgam_triton, "_chunk", lambda b, cg: (8, _lgam_triton._pow2(cg)))
    torch.manual_seed(batch)
    m = LGAM(24, groups=4, reduction=1).double().train()
    loop = copy.deepcopy(m)
    x, g = (torch.randn(batch, 24, 3, 3, dtype=torch.float64) for _ in range(2))
    yf, gxf, _, gpf = _grads(m, lambda mod, t, i: mod(t), x, x, g)
    yl, gxl, _, gpl = _grads(loop, lambda mod, t, i: lgam_reference(mod, t), x, x, g)
    for got, want in ((yf, yl), (gxf, gxl), (gpf, gpl)):
        assert _rel(got, want) <= 1e-12
    for a, b in zip(m.buffers(), loop.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_each_device_has_its_kernels():
    """The CPU's C++ kernels, CUDA's Triton ones (built without a GPU; compiled on first use),
    none elsewhere (the eager path)."""
    from lgam.attention._lgam_triton import TritonKernels

    assert isinstance(_lgam_kernel.kernels_for(torch.device("cpu")), _lgam_kernel.CppKernels)
    assert isinstance(_lgam_kernel.kernels_for(torch.device("cuda")), TritonKernels)
    assert _lgam_kernel.kernels_for(torch.device("meta")) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_kernels_pass_their_first_use_check(kernels, dtype):
    """What auto mode runs once per device and dtype before taking the kernels (on a GPU: the
    Triton kernels' first compilation there) passes for both sets of kernels, every dtype they
    take."""
    backend = _lgam_kernel.kernels_for(torch.device("cpu"))
    if dtype not in backend.dtypes:
        pytest.skip(f"{type(backend).__name__} does not take {dtype} maps")
    assert _lgam_fused.check_kernels(torch.device("cpu"), dtype) is None


class _Off(_lgam_kernel.CppKernels):
    """The CPU kernels with their forward's output 1 % off."""

    def forward(self, *args, **kwargs):
        out, s = super().forward(*args, **kwargs)
        return out * 1.01, s


class _Broken(_lgam_kernel.CppKernels):
    def scales_train(self, *args, **kwargs):
        raise RuntimeError("PTX assembly failed\nmore lines")


def test_kernels_that_fail_their_check_leave_auto_mode_eager(fused, monkeypatch):
    """A wrong result or a compiler's error in the first-use check: said (which quantity, how far
    off; the error's first line), one warning in auto mode, and the eager path from then on."""
    monkeypatch.setitem(_lgam_kernel.BACKENDS, "cpu", _Off())
    cpu = torch.device("cpu")
    assert _lgam_fused.check_kernels(cpu, torch.float32).startswith("its output is 1.")
    monkeypatch.setitem(_lgam_kernel.BACKENDS, "cpu", _Broken())
    assert _lgam_fused.check_kernels(cpu, torch.float32) == "RuntimeError: PTX assembly failed"

    set_fused_kernels(None)
    monkeypatch.setattr(_lgam_fused.FUSED, "checked", {})
    monkeypatch.setattr(_lgam_fused.FUSED, "warned", False)
    m = LGAM(16, groups=4, reduction=2).train()
    x = _cl(torch.randn(2, 16, 4, 4))
    with pytest.warns(UserWarning, match="failed their check on cpu for torch.float32: RuntimeError: PTX"):
        assert not fused_kernels_enabled(m, x)
    y = m(x)  # no second warning; eager
    torch.testing.assert_close(y, lgam_reference(copy.deepcopy(m), x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_the_triton_kernels_compile_for_nvidia_gpus_without_spilling():
    """Without a GPU, Triton's own compiler (LLVM, ptxas) builds the kernels for A100 and H100
    (sm_80, sm_90) in the variants the models meet: no compiler error, no kernel spilling
    registers (``scripts/triton_compile_check.py --quick``; the full set is its default)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "scripts/triton_compile_check.py", "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.stdout.startswith("skipped:"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "all compiled, none spilling" in proc.stdout and "| _backward_kernel | sm_90 |" in proc.stdout
