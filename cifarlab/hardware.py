"""What this machine can do, and the settings that follow from it: device, numeric precision, threads.

A leaf module (torch and cifarlab.errors only), so every layer may ask it. `precision: auto` means bf16 autocast
where the hardware runs bf16 natively (CUDA GPUs with bf16, CPUs with AVX-512 BF16 or AMX) and fp32 elsewhere:
on a CPU without those instructions oneDNN emulates bf16, about 15x slower than fp32 (the `fast` net on a 2-core
AVX2 EPYC: 53 vs 910 images/s), so "bf16 when asked" would be a trap on half the machines users have.
"""
from __future__ import annotations

import contextlib
import os
import platform
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from cifarlab.errors import ConfigError, CifarlabError

THREADS_ENV = "CIFARLAB_THREADS"
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the instructions oneDNN uses for bf16
_REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "neon", "asimd")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]  # lower-case instruction-set names as Linux reports them (empty where unknown)

    @property
    def native_bf16(self) -> bool:
        return any(flag in self.flags for flag in _NATIVE_BF16_FLAGS)

    @property
    def isa(self) -> str:
        """The instruction sets that matter for training speed, e.g. 'AVX2, AVX-512, AVX-512 BF16, AMX'."""
        names = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX-512 BF16", "amx_bf16": "AMX",
                 "neon": "NEON", "asimd": "NEON"}
        found = dict.fromkeys(names[f] for f in _REPORTED_FLAGS if f in self.flags and f in names)
        return ", ".join(found) or f"unknown ({torch.backends.cpu.get_cpu_capability()} kernels)"


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and flags in the text of /proc/cpuinfo. Virtual machines often show a bare
    or generic name ("AMD EPYC", "Intel Xeon CPU @ 2.20GHz") that does not tell CPU generations apart, so x86 family
    and model numbers are appended to the name (AMD family 25 is Zen 3/4, 26 is Zen 5)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if not key and fields:
            break  # a blank line ends the first processor's block
        fields.setdefault(key, value)
    model = fields.get("model name", "")
    if model and fields.get("cpu family", "").isdigit():
        model += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    flags = frozenset((fields.get("flags") or fields.get("features") or "").lower().split())
    return CpuInfo(model=model, flags=flags)


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """The CPU's model name and flags, read from /proc/cpuinfo on Linux (elsewhere: the platform's processor name)."""
    info = CpuInfo(model="", flags=frozenset())
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            info = parse_cpuinfo(f.read())
    return CpuInfo(model=info.model or platform.processor() or platform.machine(), flags=info.flags)


def machine_name(device: torch.device) -> str:
    """What a run on `device` computes on, for benchmark tables: the GPU's name, or the CPU's model and ISA."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (MPS)"
    info = cpu_info()
    return f"{info.model} ({info.isa})"


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA, else MPS, else CPU; an explicit device that is not there is a clear error."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CifarlabError("--device cuda was asked for but CUDA is not available here; use --device cpu or auto")
    if name == "mps" and not mps:
        raise CifarlabError("--device mps was asked for but MPS is not available here; use --device cpu or auto")
    return torch.device(name)


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "fp32" or "bf16"
    reason: str  # one line for summaries, `cifarlab env` and bug reports


def choose_precision(device: torch.device, requested: str = "auto", *, per_example: bool = False) -> PrecisionChoice:
    """What a run with `requested` ("auto", "fp32", "bf16") computes in on `device`, and why. `per_example`: the run
    clips per-example gradients (DP-SGD), whose norms and clipping stay fp32 under bf16 (cifarlab.privacy)."""
    if requested == "fp32":
        return PrecisionChoice("fp32", "fp32 asked for")
    if requested == "auto" and per_example and device.type == "cpu":
        # Measured on a CPU with native bf16 (docs/privacy.md): the fp32 per-example work dominates a DP step, and
        # the casts around it made bf16 DP runs slower than fp32 ones, and no more accurate.
        return PrecisionChoice("fp32", "auto: DP-SGD on a CPU computes in fp32 (bf16 measured slower there)")
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        where = f"{torch.cuda.get_device_name(device)} {'supports' if native else 'lacks'} bf16"
    elif device.type == "cpu":
        native = cpu_info().native_bf16
        where = f"CPU {'has' if native else 'lacks'} native bf16 (AVX-512 BF16 or AMX)"
    else:
        native, where = False, f"bf16 autocast is not used on {device.type}"
    if requested == "bf16":
        return PrecisionChoice("bf16", f"bf16 asked for; {where}" + ("" if native else ": emulated, slower"))
    return PrecisionChoice("bf16" if native else "fp32", f"auto: {where}")


def resolve_precision(device: torch.device, precision: str) -> str:
    return choose_precision(device, precision).precision


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of bf16 autocast contexts where `choose_precision` says bf16, else of null contexts.

    An explicit bf16 on a CPU without native bf16 still runs, with a warning: the user asked for it.
    """
    choice = choose_precision(device, precision)
    if choice.precision == "fp32":
        return contextlib.nullcontext
    if device.type == "cpu" and not cpu_info().native_bf16:
        warnings.warn("precision bf16 on a CPU without native bf16 (AVX-512 BF16 or AMX) is emulated, about 15x "
                      "slower than fp32; leave --precision at auto on this machine", stacklevel=2)
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset restrict), not the host's."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parse_threads(value: object, *, source: str) -> int:
    """A thread count from a flag or the environment: a whole number >= 1, else ConfigError naming `source`."""
    text = str(value).strip()
    if not text.lstrip("+").isdigit() or int(text) < 1:
        raise ConfigError(f"{source} must be a whole number of threads >= 1, got {value!r}")
    return int(text)


def thread_count(flag: int | str | None = None) -> int:
    """The intra-op thread count to use: the flag, else $CIFARLAB_THREADS, else the cores this process may use."""
    if flag is not None:
        return parse_threads(flag, source="--threads")
    if os.environ.get(THREADS_ENV, "").strip():
        return parse_threads(os.environ[THREADS_ENV], source=f"${THREADS_ENV}")
    return available_cores()
