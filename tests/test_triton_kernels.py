"""The Triton backend's kernels, tested on machines without a GPU in Triton's interpreter.

Triton chooses between compiling and interpreting when it is first imported (its own library's functions are
defined then), so the interpreted tests run in a subprocess started with TRITON_INTERPRET=1: the dispatch
test's Triton cases (every operation against the exact result and the reference) and tests/triton_interpreted.py.
This process keeps Triton compiled, as the rest of the suite sees it. On CUDA, tests/test_cuda.py runs them on
the GPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton is installed by `make setup` (the triton extra)")

from workbench.kernels import backend_triton, dispatch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_every_kernel_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "WORKBENCH_KERNELS": ""}
    files = ["tests/test_kernel_dispatch.py", "tests/triton_interpreted.py"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files,
                          "-k", "triton or every_backend"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    # one case per operation, the coverage check, and at least one run of each test of triton_interpreted.py
    tests = (ROOT / "tests/triton_interpreted.py").read_text().count("\ndef test_")
    expected = len(backend_triton.OPERATIONS) + 1 + tests
    assert passed and int(passed.group(1)) >= expected and "skipped" not in summary, summary


def test_compiled_here_the_backend_says_it_needs_a_gpu():
    assert not backend_triton.interpreting()  # this process: Triton as imported without TRITON_INTERPRET
    cuda = torch.device("cuda")
    assert backend_triton.supports("rms_norm", cuda, torch.bfloat16)
    assert not backend_triton.supports("rms_norm", torch.device("cpu"), torch.bfloat16)
    assert not backend_triton.supports("rms_norm", cuda, torch.float64)
    if not torch.cuda.is_available():
        assert not backend_triton.available() and "TRITON_INTERPRET=1" in backend_triton.unavailable_reason()
        assert "triton" not in dispatch.available_backends()
