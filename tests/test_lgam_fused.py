"""LGAM's fused (compiled) path against the loop transcription of eqs (1)-(7), and when it is
taken. Each new shape compiles (seconds): the cases are few and small."""
import copy

import pytest
import torch

from lgam import create_model
from lgam.attention import (LGAM, capture_gates, fused_kernels, fused_kernels_enabled, fused_kernels_setting,
                            set_fused_kernels)
from lgam.attention import _lgam_fused
from lgam.attention.lgam import lgam_reference
from test_lgam_module import _module, _rel, _run


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("groups, layout", [(1, "cl"), (4, "cl"), (8, "cl"), (4, "nchw")])
def test_fused_path_matches_loop_oracle_in_float64(fused, groups, layout, train):
    """Outputs, input and parameter gradients and BN running statistics to float64 accuracy, for
    channels_last and contiguous input (each keeps its layout)."""
    fast = _module(groups, train).double()
    loop = copy.deepcopy(fast)
    x = torch.randn(4, 128, 5, 5, dtype=torch.float64)
    g = torch.randn(4, 128, 5, 5, dtype=torch.float64)
    to_layout = _cl if layout == "cl" else torch.Tensor.contiguous
    assert fused_kernels_enabled(fast, to_layout(x))
    yf, gxf, gpf = _run(fast, lambda m, t: m(to_layout(t)), x, g)
    yl, gxl, gpl = _run(loop, lgam_reference, x, g)
    assert yf.dtype == gxf.dtype == torch.float64
    assert yf.is_contiguous(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)
    assert _rel(yf, yl) <= 1e-12
    assert _rel(gxf, gxl) <= 1e-12
    assert _rel(gpf, gpl) <= 1e-12
    for a, b in zip(fast.buffers(), loop.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fused_gradcheck(fused):
    torch.manual_seed(0)
    m = LGAM(16, groups=4, reduction=2).double().train()
    x = _cl(torch.randn(3, 16, 4, 5, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(m, (x,))


def test_fused_bf16_keeps_every_group_of_g32():
    """G=32 under bf16 autocast: every group within 1e-2 of float64 (bf16 rounds at ~4e-3); the
    fused path computes in float32 from the bf16 input and rounds once."""
    set_fused_kernels(True)
    torch.manual_seed(0)
    m = LGAM(256, groups=32, reduction=2).eval()
    x = torch.randn(2, 256, 8, 8).bfloat16()
    with torch.no_grad():
        exact = lgam_reference(copy.deepcopy(m).double(), x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(_cl(x))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    for got, want in zip(y.double().chunk(32, dim=1), exact.chunk(32, dim=1)):
        assert _rel(got, want) <= 1e-2


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


def test_which_input_takes_the_fused_path(fused):
    x = torch.randn(2, 32, 4, 4)
    m, g32 = LGAM(32, groups=4, reduction=2), LGAM(32, groups=32, reduction=1)
    assert fused_kernels_enabled(m, _cl(x)) and fused_kernels_enabled(m, x)
    assert fused_kernels_enabled(g32, _cl(x))
    set_fused_kernels(False)
    assert not fused_kernels_enabled(m, _cl(x))
    set_fused_kernels(None)  # auto: the CPU, where a C++ compiler builds the kernels, G <= 8
    assert fused_kernels_enabled(m, _cl(x)) == (_lgam_fused.compiler_missing() is None)
    assert not fused_kernels_enabled(g32, _cl(x))
    with pytest.raises(ValueError, match="True, False or None"):
        set_fused_kernels("yes")
    set_fused_kernels(True)
    with fused_kernels(False):
        assert not fused_kernels_enabled(m, x) and fused_kernels_setting() == "off"
    assert fused_kernels_enabled(m, x) and fused_kernels_setting() == "on"


def test_a_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    """Auto mode: a compiler that fails (here: made to) costs one warning, then the eager path
    for the rest of the process; with the path forced on, the failure is raised."""
    def broken(module, x):
        raise torch._dynamo.exc.BackendCompilerFailed(broken, RuntimeError("no compiler"), None)

    monkeypatch.setattr(_lgam_fused.FUSED, "compiled", lambda: broken)
    monkeypatch.setattr(_lgam_fused, "compiler_missing", lambda: None)
    m = LGAM(16, groups=4, reduction=2).eval()
    x = _cl(torch.randn(2, 16, 4, 4))
    set_fused_kernels(None)
    with pytest.warns(UserWarning, match="eager path"):
        y = m(x)
    torch.testing.assert_close(y, m.forward_eager(x)[0])
    assert not fused_kernels_enabled(m, x) and "no compiler" in _lgam_fused.FUSED.broken
    set_fused_kernels(True)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):
        m(x)


def test_inside_a_compiled_model_the_fused_formulation_is_inlined(fused):
    """``torch.compile`` of a whole model (``lgam train --compile``) traces the fused formulation
    in place of the nested compiled call: same result as the loop, and its gradient."""
    torch.manual_seed(0)
    m = LGAM(32, groups=4, reduction=2).double().train()
    x = _cl(torch.randn(4, 32, 5, 5, dtype=torch.float64))
    loop = copy.deepcopy(m)
    y = torch.compile(torch.nn.Sequential(m), dynamic=False)(x.clone().requires_grad_(True))
    assert _rel(y, lgam_reference(loop, x)) <= 1e-12


def test_no_python_headers_means_no_fused_path(monkeypatch, tmp_path):
    """Inductor's CPU kernels are Python extensions: without Python.h auto mode stays eager."""
    monkeypatch.setattr(_lgam_fused.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    _lgam_fused.compiler_missing.cache_clear()
    try:
        assert "Python.h" in _lgam_fused.compiler_missing()
        set_fused_kernels(None)
        assert not fused_kernels_enabled(LGAM(16, groups=4, reduction=2), torch.randn(2, 16, 4, 4))
        assert fused_kernels_setting().startswith("auto (eager here: no Python headers")
    finally:
        _lgam_fused.compiler_missing.cache_clear()
