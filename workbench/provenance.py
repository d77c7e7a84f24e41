"""Where a result came from: the code, the machine, the libraries and the kernels that ran.

Every trace carries `provenance()` (and so every stored run, `generate --json` and `bench` results), so a
figure can be trusted, or told apart, later. The git facts are read once per process.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from workbench.kernels import cpu as cpu_kernels
from workbench.kernels import dispatch

ROOT = Path(__file__).resolve().parent.parent
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "neon", "sve")  # the ones the kernels or torch use


@functools.cache
def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the project's checkout; (None, None) outside a git checkout or without git."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(status.strip())


@functools.cache
def cpu_description() -> tuple[str, list[str]]:
    """The CPU's model name and which of ISA_FLAGS it has (from /proc/cpuinfo where there is one)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return fields.get("model name", platform.machine()), [f for f in ISA_FLAGS if f in flags]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def backends(model: torch.nn.Module | None, used: set[tuple[str, str]]) -> dict[str, str]:
    """Which backend ran each operation ({operation: "c" | "torch" | "c+torch"}), from what the kernel seam
    recorded during the run (`dispatch.recorded`); plain `nn.Linear` layers (float32, or where nothing packs
    the weights) run torch's product without passing the seam, so the model's are added as "linear"."""
    pairs = set(used)
    if model is not None and any(type(m) is torch.nn.Linear for m in model.modules()):
        pairs.add(("linear", "torch"))
    return dispatch.backends_used(pairs)


def provenance(model: torch.nn.Module | None, device: torch.device, dtype: torch.dtype,
               used: set[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Where a result comes from; `used`: the (operation, backend) pairs the run recorded (`backends` is {}
    until the run has them)."""
    commit, dirty = git_state()
    cpu, isa = cpu_description()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "commit": commit, "dirty": dirty, "cpu": cpu, "isa": isa, "gpu": gpu,
        "backends": backends(model, used or set()),
        "kernels_note": cpu_kernels.unavailable_reason() or None,
        "cpu_products": cpu_kernels.product_unit(),  # "amx" or "avx512-bf16", products and attention alike
        "versions": {p: _version(p) for p in ("torch", "transformers", "duckdb", "workbench")},
        "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
    }
