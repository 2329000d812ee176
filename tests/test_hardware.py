"""Precision and threads chosen for the machine, with the CPU's capabilities faked both ways."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cifarlab import hardware
from cifarlab.errors import ConfigError

CPU = torch.device("cpu")
AVX2_ONLY = hardware.CpuInfo(model="AMD EPYC (AVX2)", flags=frozenset({"avx", "avx2", "fma"}))
AVX512_BF16 = hardware.CpuInfo(model="AMD EPYC (Zen 4)", flags=frozenset({"avx2", "avx512f", "avx512_bf16"}))
AMX = hardware.CpuInfo(model="Intel Xeon (Sapphire Rapids)", flags=frozenset({"avx2", "avx512f", "amx_bf16"}))


@pytest.fixture
def fake_cpu(monkeypatch):
    def fake(info: hardware.CpuInfo) -> None:
        monkeypatch.setattr(hardware, "cpu_info", lambda: info)

    return fake


def test_auto_is_fp32_on_a_cpu_without_native_bf16(fake_cpu):
    fake_cpu(AVX2_ONLY)
    choice = hardware.choose_precision(CPU, "auto")
    assert choice.precision == "fp32" and "lacks native bf16" in choice.reason
    with hardware.autocast_for(CPU, "auto")():
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("info", [AVX512_BF16, AMX], ids=["avx512-bf16", "amx"])
def test_auto_is_bf16_on_a_cpu_with_native_bf16(fake_cpu, info):
    fake_cpu(info)
    choice = hardware.choose_precision(CPU, "auto")
    assert choice.precision == "bf16" and "has native bf16" in choice.reason
    with hardware.autocast_for(CPU, "auto")():
        assert torch.is_autocast_enabled("cpu")
        assert nn.Linear(4, 2)(torch.ones(1, 4)).dtype == torch.bfloat16


def test_explicit_bf16_runs_with_a_warning_where_emulated(fake_cpu):
    fake_cpu(AVX2_ONLY)
    with pytest.warns(UserWarning, match="emulated"):
        autocast = hardware.autocast_for(CPU, "bf16")
    with autocast():
        assert torch.is_autocast_enabled("cpu")
    assert hardware.choose_precision(CPU, "bf16").reason.endswith("emulated, slower")


def test_explicit_fp32_is_fp32_everywhere(fake_cpu):
    fake_cpu(AMX)
    assert hardware.choose_precision(CPU, "fp32") == hardware.PrecisionChoice("fp32", "fp32 asked for")
    assert hardware.resolve_precision(CPU, "fp32") == "fp32"


def test_cuda_auto_follows_the_gpus_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
        assert hardware.resolve_precision(torch.device("cuda"), "auto") == expected


def test_isa_names_the_instruction_sets():
    assert AVX2_ONLY.isa == "AVX2" and not AVX2_ONLY.native_bf16
    assert AMX.isa == "AVX2, AVX-512, AMX" and AMX.native_bf16


def test_machine_name_is_the_cpus_model_and_isa_or_the_gpus_name(fake_cpu, monkeypatch):
    fake_cpu(AMX)
    assert hardware.machine_name(CPU) == "Intel Xeon (Sapphire Rapids) (AVX2, AVX-512, AMX)"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    assert hardware.machine_name(torch.device("cuda")) == "Fake GPU"


def test_cpu_info_reads_this_machine():
    info = hardware.cpu_info()
    assert info.model and isinstance(info.flags, frozenset)


def test_threads_default_to_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.delenv(hardware.THREADS_ENV, raising=False)
    assert hardware.thread_count() == hardware.available_cores() >= 1
    monkeypatch.setenv(hardware.THREADS_ENV, "3")
    assert hardware.thread_count() == 3
    assert hardware.thread_count(5) == 5  # the flag wins over the environment


@pytest.mark.parametrize("bad", ["0", "-2", "1.5", "two", ""])
def test_bad_thread_counts_are_refused(bad, monkeypatch):
    with pytest.raises(ConfigError, match="--threads must be a whole number of threads >= 1"):
        hardware.thread_count(bad)
    if bad:
        monkeypatch.setenv(hardware.THREADS_ENV, bad)
        with pytest.raises(ConfigError, match=r"\$CIFARLAB_THREADS must be"):
            hardware.thread_count()


def test_unavailable_devices_are_clear_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Exception, match="CUDA is not available"):
        hardware.resolve_device("cuda")
    assert hardware.resolve_device("cpu") == CPU


def _cpuinfo(name: str, family: str = "26", flags: str = "fpu avx2 avx512f avx512_bf16") -> str:
    block = f"processor\t: {{}}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: 2\n" \
            f"model name\t: {name}\nflags\t\t: {flags}\n"
    return "\n".join(block.format(i) for i in range(2))


def test_the_name_gets_the_family_and_model_that_tell_generations_apart():
    info = hardware.parse_cpuinfo(_cpuinfo("AMD EPYC"))
    assert info.model == "AMD EPYC (family 26, model 2)"
    assert info.native_bf16 and info.isa == "AVX2, AVX-512, AVX-512 BF16"


def test_the_flags_of_the_first_processor_are_read():
    info = hardware.parse_cpuinfo(_cpuinfo("AMD EPYC 9R14 96-Core Processor", family="25", flags="fpu avx2"))
    assert info.model == "AMD EPYC 9R14 96-Core Processor (family 25, model 2)"
    assert info.flags == {"fpu", "avx2"} and not info.native_bf16


def test_arm_cpuinfo_reads_its_features_line():
    info = hardware.parse_cpuinfo("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16\n\n")
    assert info.model == "" and "asimd" in info.flags and info.isa == "NEON"


def test_auto_keeps_dp_sgd_in_fp32_on_a_cpu_with_native_bf16_but_bf16_asked_for_is_kept(fake_cpu):
    fake_cpu(AVX512_BF16)
    choice = hardware.choose_precision(CPU, "auto", per_example=True)
    assert choice.precision == "fp32" and "DP-SGD" in choice.reason
    assert hardware.choose_precision(CPU, "bf16", per_example=True).precision == "bf16"
    assert hardware.choose_precision(CPU, "auto").precision == "bf16"  # plain training keeps native bf16
