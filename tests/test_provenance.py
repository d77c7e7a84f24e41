"""Provenance: every result says which code, machine, libraries and kernels produced it; a kernel that cannot
run says why, once, in plain words."""

import json
import subprocess
import warnings

import duckdb
import pytest
import torch

from workbench import Workbench
from workbench.cli import main
from workbench.kernels import cpu as cpu_kernels
from workbench.kernels import dispatch
from workbench.provenance import ROOT


@pytest.fixture(scope="module")
def trace():
    return Workbench("random:llama", dtype="float32").generate("5 6 7 8", "max_new_tokens=3")


def test_a_trace_records_where_it_came_from(trace):
    p = trace.summary()["provenance"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert p["commit"] == head.strip() and isinstance(p["dirty"], bool)
    assert p["versions"]["torch"] == torch.__version__.split("+")[0] or p["versions"]["torch"] == torch.__version__
    assert p["versions"]["duckdb"] == duckdb.__version__
    assert p["dtype"] == "float32" and p["threads"] == torch.get_num_threads() and p["gpu"] is None
    assert p["backends"]["linear"] == "torch" and p["backends"]["rms_norm"] == "torch"  # the C kernels are bf16
    assert p["cpu"] and isinstance(p["isa"], list)


def test_bf16_records_the_backend_each_operation_ran_in():
    wb = Workbench("random:llama", dtype="bfloat16")
    p = wb.generate("5 6 7 8", "max_new_tokens=2").summary()["provenance"]
    if not cpu_kernels.available():  # the kernels' absence is recorded instead, with its reason
        assert set(p["backends"].values()) == {"torch"} and p["kernels_note"]
        return
    # the tiny model's heads have 16 dims: the C RoPE (and so the one-call layers) take multiples of 32, so its
    # RoPE ran in the reference, and the record says so; a 4-token prompt is a short chunk (tree_attention)
    assert p["backends"] == {"linear": "c", "attention": "c", "tree_attention": "c", "rms_norm": "c",
                             "add_rms_norm": "c", "rope": "torch", "swiglu": "c", "topk": "c"}
    assert "avx512_bf16" in p["isa"] and p["kernels_note"] is None
    assert p["cpu_products"] == cpu_kernels.product_unit() and p["cpu_products"] in ("amx", "avx512-bf16")


def test_a_run_records_what_it_ran_not_what_another_run_did(monkeypatch):
    monkeypatch.setenv("WORKBENCH_KERNELS", "torch")
    dispatch.reset()
    try:
        wb = Workbench("random:llama", dtype="bfloat16")
        forced = wb.generate("5 6 7 8", "max_new_tokens=2").summary()["provenance"]["backends"]
        exact = Workbench("random:llama", dtype="float32").generate("5 6 7 8", "max_new_tokens=2")
    finally:
        monkeypatch.delenv("WORKBENCH_KERNELS")
        dispatch.reset()
    assert set(forced.values()) == {"torch"} and {"linear", "attention", "rms_norm", "topk"} <= set(forced)
    assert exact.summary()["provenance"]["backends"]["linear"] == "torch"  # plain nn.Linear, float32


def test_generate_json_and_the_store_carry_it(tmp_path, capsys):
    store = tmp_path / "runs.duckdb"
    assert main(["generate", "5 6 7", "--model", "random:llama", "--no-chat", "--json", "--store", str(store),
                 "--spec", "max_new_tokens=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["provenance"]["commit"] and out["provenance"]["backends"]
    con = duckdb.connect(str(store), read_only=True)
    commit, = con.execute("SELECT commit FROM run_summary").fetchone()
    assert commit == out["provenance"]["commit"]


def test_kernels_that_cannot_run_say_why_once(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setattr(cpu_kernels, "_reason", "")  # restored afterwards, with the working library
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)  # no compiler on this "machine"
    monkeypatch.delenv("WORKBENCH_CPU_KERNELS", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cpu_kernels.available() and not cpu_kernels.available()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "no C compiler" in message and "slower" in message and "Traceback" not in message
    assert cpu_kernels.unavailable_reason().startswith("no C compiler")


def test_a_library_that_fails_to_load_is_a_plain_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setattr(cpu_kernels, "_reason", "")  # restored afterwards, with the working library
    monkeypatch.delenv("WORKBENCH_CPU_KERNELS", raising=False)

    def broken(path):
        raise OSError(f"{path}: invalid ELF header")

    monkeypatch.setattr(cpu_kernels.ctypes, "CDLL", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cpu_kernels.available()
    assert "could not be loaded" in str(caught[0].message) and "delete it to rebuild" in str(caught[0].message)
