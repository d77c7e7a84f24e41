"""FLIQS (a policy over integer and float formats per linear, trained by REINFORCE on a cost-penalised reward)
on tiny random models (seconds)."""

import pytest
import torch

from workbench.cli import main
from workbench.compression.base import apply_compression, dense_weight, linear_sites, weight_nbytes
from workbench.compression.calibration import segments
from workbench.compression.fliqs import FormatTable, fliqs_plan, plan_specs, repair
from workbench.compression.search import search
from workbench.errors import SpecError
from workbench.models import LoadedModel
from workbench.spec import RunSpec

from .helpers import varied_model

pytestmark = pytest.mark.usefixtures("one_thread")
MENU = ["int4:bits=2,group=32", "int4:bits=4,group=32", "fp4:format=e2m1,group=32,calibrate=false", "mx:format=fp4",
        "int8:head=false"]


def loaded_tiny() -> LoadedModel:
    model = varied_model("llama").float()
    return LoadedModel(model, None, model.config, "tiny", "tiny", torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def table(module_one_thread):
    with torch.no_grad():
        return FormatTable.build(loaded_tiny(), MENU, progress=False)


def test_a_plan_runs_as_the_chain_it_writes_with_the_weights_and_bytes_it_was_scored_with(table):
    plan = [k % len(MENU) for k in range(len(table.names))]  # every format on some linear
    loaded = loaded_tiny()
    apply_compression(loaded, plan_specs(table, plan))
    sites = linear_sites(loaded.model, head=False)
    assert [s.name for s in sites] == table.names
    for site, k in zip(sites, plan):
        assert torch.equal(dense_weight(site.module), table.weights[site.name][k])
    stored = sum(weight_nbytes(s.module) for s in sites)
    assert table.bits(plan) == pytest.approx(8 * stored / sum(table.sizes.values()))
    assert {t.name for t in plan_specs(table, plan)} == {"int4", "fp4", "mx", "int8"}  # integer and float


def test_the_controller_learns_lower_loss_on_the_budget(table):
    model = loaded_tiny().model
    segs = segments(torch.randint(0, 512, (512,), generator=torch.Generator().manual_seed(0)), 64)
    budget = 5.0  # between 2-bit (3 bits stored here: float32 scales) and int8
    plan, record = fliqs_plan(model, table, segs, budget, 160, 10.0, 0.05, 0, float("inf"), progress=False)
    assert record["steps"] == 160 and table.bits(plan) <= budget
    first, last = slice(0, 30), slice(-30, None)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(record["kl"][last]) < 0.7 * mean(record["kl"][first])
    assert mean(record["reward"][last]) > mean(record["reward"][first])
    assert abs(mean(record["bits"][last]) / budget - 1) < abs(mean(record["bits"][first]) / budget - 1)
    original = loaded_tiny().model  # the model comes back with its own weights
    for a, b in zip(linear_sites(model, head=False), linear_sites(original, head=False)):
        assert torch.equal(a.module.weight, b.module.weight)


def test_repair_moves_the_least_likely_linears_to_cheaper_formats_until_the_plan_fits(table):
    logits = torch.zeros(len(table.names), len(MENU))
    logits[:, 4] = 5.0  # int8 everywhere is the policy's choice...
    logits[0, 0] = 4.9  # ...but the first linear's 2-bit format is almost as likely
    plan = repair(table, logits, [4] * len(table.names), table.bits([4] * len(table.names)) - 0.01)
    assert plan[0] == 0 and plan[1:] == [4] * (len(plan) - 1)
    assert repair(table, logits, [1] * len(plan), 100.0) == [1] * len(plan)  # under budget: unchanged
    with pytest.raises(SpecError, match="no plan of these formats fits 1.000 bits per weight"):
        repair(table, logits, [4] * len(plan), 1.0)


def test_workbench_search_fliqs_writes_a_runnable_plan(tmp_path, monkeypatch):
    monkeypatch.setattr("workbench.compression.fliqs.FORMATS", tuple(MENU))
    out = tmp_path / "plan.txt"
    assert main(["search", "--method", "fliqs", "--model", "random:llama", "--budget-bits", "4", "--group", "32",
                 "--minutes", "0.02", "--tokens", "256", "-o", str(out)]) == 0
    spec = RunSpec.parse(out.read_text().strip())
    assert spec.compress and {t.name for t in spec.compress} <= {"int4", "fp4", "mx", "int8"}
    with pytest.raises(SpecError, match="--quantizer applies to hawq and evopress"):
        search("random:llama", "fliqs", 4.0, 0.02, group=32, quantizer="gptq")
