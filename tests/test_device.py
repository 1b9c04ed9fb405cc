import pytest
import torch

from lgam.device import bf16_native, cpu_has_native_bf16, device_summary, resolve_device


def test_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_unknown_device_name():
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.parametrize("machine,text,expected", [
    ("x86_64", "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n", True),
    ("x86_64", "flags\t\t: fpu sse avx2 avx512f amx_bf16\n", True),
    ("x86_64", "flags\t\t: fpu sse avx2 avx512f avx512_vnni\n", False),
    ("aarch64", "Features\t: fp asimd sve bf16 i8mm\n", True),
    ("aarch64", "Features\t: fp asimd\n", False),
    ("riscv64", "flags\t: avx512_bf16\n", False),
])
def test_native_bf16_from_cpu_flags(tmp_path, machine, text, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert cpu_has_native_bf16(str(cpuinfo), machine) is (expected and torch.backends.mkldnn.is_available())


def test_no_cpuinfo_means_no_native_bf16(tmp_path):
    assert cpu_has_native_bf16(str(tmp_path / "absent"), "x86_64") is False


def test_fast_path_and_summary():
    cpu = torch.device("cpu")
    assert bf16_native(cpu) is cpu_has_native_bf16()
    assert bf16_native(torch.device("meta")) is False
    assert device_summary(cpu).startswith("cpu: ") and "bf16" in device_summary(cpu)
