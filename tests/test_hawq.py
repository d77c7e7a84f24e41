"""HAWQ's curvature traces: both Hutchinson estimators are unbiased, the Fisher one is never negative, and the
search takes either (tiny models, seconds)."""

import json
import time

import pytest
import torch

from workbench.compression.base import linear_sites
from workbench.compression.hawq import _fisher_probe, _hessian_probe, trace_estimates
from workbench.compression.search import search
from workbench.errors import SpecError
from workbench.spec import RunSpec

from .helpers import varied_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("probe", [_fisher_probe, _hessian_probe])
def test_each_probe_estimates_the_trace_of_a_softmax_regressions_curvature(probe):
    # logits = x Wᵀ: the loss Hessian in W is the Gauss-Newton matrix (the logits are linear in W), and its
    # trace for the mean loss over n positions is Σ_t ‖x_t‖² (1 − ‖p_t‖²) / n in closed form.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 8, generator=g)
    w = (torch.randn(16, 8, generator=g) * 0.5).requires_grad_(True)
    seg = torch.randint(0, 16, (9,), generator=g)
    p = torch.softmax(x[:-1] @ w.detach().T, -1)
    exact = float((x[:-1].pow(2).sum(-1) * (1 - p.pow(2).sum(-1))).mean())
    samples = [probe(x @ w.T, seg, [w], g)[0] for _ in range(3000)]
    assert sum(samples) / len(samples) == pytest.approx(exact, rel=0.05)
    if probe is _fisher_probe:
        assert min(samples) >= 0


def test_fisher_traces_are_positive_and_both_curvatures_trace_every_linear():
    model = varied_model("llama", layers=2).float()
    sites = linear_sites(model, head=False)
    segments = [torch.randint(0, model.config.vocab_size, (80,), generator=torch.Generator().manual_seed(k))
                for k in range(2)]
    fisher, done = trace_estimates(model, sites, segments, 3, 0, time.monotonic() + 60, "fisher", progress=False)
    assert done == 3 and set(fisher) == {s.name for s in sites} and min(fisher.values()) > 0
    hessian, _ = trace_estimates(model, sites, segments, 1, 0, time.monotonic() + 60, "hessian", progress=False)
    assert set(hessian) == set(fisher) and len(set(hessian.values())) == len(sites)
    assert all(not p.requires_grad for p in model.parameters())  # the model is left as it was


def test_search_takes_either_curvature_and_names_the_valid_ones():
    result = search("random:llama", "hawq", 2.5, 0.05, group=32, tokens=256, samples=1, progress=False,
                    curvature="hessian")
    assert result.details["curvature"] == "hessian" and result.details["trace_samples"] == 1
    with pytest.raises(SpecError, match="unknown curvature 'gauss'; valid: fisher, hessian"):
        search("random:llama", "hawq", 2.5, 0.05, curvature="gauss")


def test_workbench_search_hawq_records_its_curvature(tmp_path):
    from workbench.cli import main

    out, record = tmp_path / "plan.txt", tmp_path / "plan.json"
    assert main(["search", "--method", "hawq", "--curvature", "hessian", "--model", "random:llama", "--budget-bits",
                 "2.5", "--group", "32", "--minutes", "0.02", "--tokens", "256", "-o", str(out),
                 "--json", str(record)]) == 0
    assert RunSpec.parse(out.read_text().strip()).compress
    assert json.loads(record.read_text())["details"]["curvature"] == "hessian"
