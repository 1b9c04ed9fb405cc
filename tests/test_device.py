import pytest
import torch

import lgam.device
from lgam.device import bf16_native, cpu_has_native_bf16, cuda_arch_problem, device_summary, resolve_device


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


def test_fast_path_and_summary(monkeypatch):
    import lgam.device

    cpu = torch.device("cpu")
    for native in (True, False):  # the CPU's answer is its flags' (read from /proc/cpuinfo)
        monkeypatch.setattr(lgam.device, "cpu_has_native_bf16", lambda *a, native=native: native)
        assert bf16_native(cpu) is native
    monkeypatch.undo()
    assert bf16_native(torch.device("meta")) is False
    assert device_summary(cpu).startswith("cpu: ") and "bf16" in device_summary(cpu)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA build (sm_75 and newer, as PyPI's CUDA 13 wheels) seeing one GPU of the capability
    the test sets: no GPU needed."""
    gpu = {"capability": (9, 0), "name": "NVIDIA H100"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90a", "sm_120"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu["name"])
    monkeypatch.setattr(lgam.device, "_compute_capability", lambda device: gpu["capability"])
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return gpu


def test_a_supported_gpu_is_chosen(fake_gpu):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert cuda_arch_problem(torch.device("cuda", 0)) is None


def test_a_gpu_older_than_the_build_falls_back_to_the_cpu(fake_gpu):
    # a V100 under a build that starts at sm_75: "auto" warns and runs on the CPU instead of
    # failing on the first kernel; asking for "cuda" is an error that says why
    fake_gpu.update(capability=(7, 0), name="Tesla V100-SXM2-16GB")
    with pytest.warns(RuntimeWarning, match=r"Tesla V100.*compute capability 7\.0.*sm_75 and newer.*CPU"):
        assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"capability 7\.0\) is older"):
        resolve_device("cuda")


def test_a_gpu_index_past_the_last_is_a_value_error(fake_gpu, monkeypatch):
    """torch raises an AssertionError ("Invalid device id") there, which the CLIs do not catch."""
    with pytest.raises(ValueError, match=r"'cuda:3' requested but this machine has 1 GPU\(s\): cuda:0 .. cuda:0"):
        resolve_device("cuda:3")
    monkeypatch.setenv("LOCAL_RANK", "2")  # torchrun with more processes than GPUs
    with pytest.raises(ValueError, match="'cuda:2' requested"):
        resolve_device("auto")


def test_a_build_without_sm_archs_is_not_judged(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: [])
    fake_gpu.update(capability=(3, 5))
    assert cuda_arch_problem(torch.device("cuda", 0)) is None


@pytest.mark.parametrize("capability,expected", [((7, 5), False), ((7, 0), False), ((8, 0), True),
                                                 ((8, 9), True), ((12, 0), True)])
def test_bf16_is_the_fast_path_on_gpus_with_bf16_tensor_cores_only(fake_gpu, capability, expected):
    # a T4 (7.5) emulates bf16: autocast there is slower than float32, so "auto" must not pick it
    fake_gpu.update(capability=capability)
    assert bf16_native(torch.device("cuda", 0)) is expected
