"""The static decoding step (workbench/models/static_step.py): on the CPU it runs eagerly on the same static
buffers a CUDA graph would replay, so these tests prove the step itself: its logits are the eager forward's for
one token and for trees under their mask, whole runs give the eager path's tokens, and it falls back to the eager
forward where a run or a step does not suit it. The capture itself is tested on CUDA (tests/test_triton_cuda.py)."""

import pytest
import torch

from tests.test_kernel_dispatch import tree_mask
from workbench.api import Workbench
from workbench.cache.kivi import KiviPolicy
from workbench.engine import build_cache
from workbench.errors import SpecError
from workbench.models.random import random_model
from workbench.models.static_step import MAX_SHAPES, StaticSteps
from workbench.spec import RunSpec

PROMPT = " ".join(str(i) for i in [5, 6, 7, 8, 9, 10] * 3)  # repeats, so prompt lookup drafts


@pytest.fixture(scope="module")
def workbench():
    return Workbench("random:llama", dtype="float32")


def run(workbench, spec: str):
    trace = workbench.generate(PROMPT, f"{spec};max_new_tokens=8;ignore_eos=true")
    return trace.token_ids, trace.summary()["provenance"]["graphs"]


@torch.inference_mode()
def test_static_step_logits_are_the_eager_forwards_for_one_token_and_trees():
    model = random_model("llama")
    eager_cache, static_cache = build_cache(model, [], 64), build_cache(model, [], 64)
    for cache in (eager_cache, static_cache):
        model(torch.arange(10), torch.arange(10), cache)
        cache.commit()
    steps = StaticSteps(model, static_cache, [], "on")
    for held, n in zip(range(10, 14), (1, 4, 1, 5)):  # each step keeps one token
        tokens, positions = torch.arange(20, 20 + n), held + torch.tensor([0, 1, 1, 2, 2][:n])
        mask = tree_mask(n) if n > 1 else None
        eager = model(tokens, positions, eager_cache, mask).logits
        static = steps.forward(tokens, positions, mask, False).logits
        assert torch.allclose(static, eager, atol=1e-5) and static_cache.layers[0].length == held + n
        for cache in (eager_cache, static_cache):
            cache.commit([0])  # the first new token kept, as a step's accepted path
        assert torch.equal(static_cache.layers[0].view()[1], eager_cache.layers[0].view()[1])  # same inputs
        assert torch.allclose(static_cache.layers[1].view()[0], eager_cache.layers[1].view()[0], atol=1e-6)
        assert torch.equal(static_cache.layers[0].positions, eager_cache.layers[0].positions)
    assert steps.report()["shapes"] == [1, 4, 5] and steps.report()["static_steps"] == 4


def test_a_whole_run_gives_the_eager_tokens(workbench):
    eager, auto = run(workbench, "")  # auto: CUDA graphs on a CUDA device only
    static, on = run(workbench, "graphs=on")
    assert static == eager and len(eager) == 8
    assert on["ran"] == "static buffers, eager" and on["static_steps"] == 7 and on["shapes"] == [1]
    assert auto["ran"] == "off" and auto["static_steps"] == 0 and auto["eager_steps"] == 7


def test_a_tree_drafter_gives_the_eager_tokens(workbench):
    eager, _ = run(workbench, "decode=prompt_lookup:k=4;graphs=off")
    static, on = run(workbench, "decode=prompt_lookup:k=4;graphs=on")
    assert static == eager and on["static_steps"] + on["eager_steps"] >= 3
    assert any(n > 1 for n in on["shapes"]), on  # draft trees went through static steps too


def causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


@torch.inference_mode()
def test_steps_that_do_not_suit_it_fall_back_to_the_eager_forward():
    model = random_model("llama")
    cache = build_cache(model, [], 24)
    model(torch.arange(18), torch.arange(18), cache)
    cache.commit()
    steps = StaticSteps(model, cache, [], "on")
    for n in range(1, MAX_SHAPES + 1):
        assert steps.forward(torch.arange(n), torch.arange(18, 18 + n), causal(n), False) is not None
        cache.rollback()
    beyond = MAX_SHAPES + 1
    assert steps.forward(torch.arange(beyond), torch.arange(beyond), causal(beyond), False) is None
    assert steps.forward(torch.arange(1), torch.tensor([18]), None, True) is None  # hidden states asked for
    cache.layers[0].claim(5)  # 23 held: 2 more tokens would not fit the buffers
    assert steps.forward(torch.arange(2), torch.arange(2), causal(2), False) is None
    assert set(steps.report()["fallbacks"]) == {"a tree size beyond the captured ones",
                                                "the step reads or feeds hidden states",
                                                "the cache must grow or its layers differ in length"}
    kivi = StaticSteps(model, build_cache(model, [KiviPolicy()], 24), [KiviPolicy()], "on")
    assert kivi.forward(torch.arange(1), torch.tensor([0]), None, False) is None
    assert kivi.report()["refused"].startswith("a cache policy other than dense")
    assert StaticSteps(model, cache, [], "off").report()["ran"] == "off"


def test_a_compressed_cache_runs_eagerly_and_says_why(workbench):
    tokens, report = run(workbench, "cache=kivi;graphs=on")
    assert report["static_steps"] == 0 and "cache policy" in report["refused"] and len(tokens) == 8


def test_bad_modes_are_plain_errors(workbench):
    with pytest.raises(SpecError, match="unknown graphs mode 'sometimes'; valid: auto"):
        RunSpec.parse("graphs=sometimes").validated()
    with pytest.raises(SpecError, match="graphs=compile needs a CUDA device"):
        workbench.generate(PROMPT, "graphs=compile;max_new_tokens=2")
    assert RunSpec.parse("graphs=off").to_string() == "graphs=off" and RunSpec().to_string() == ""


def test_weight_layers_that_cannot_be_captured_make_a_gpu_run_step_eagerly():
    """Pruning's bitmap layer decodes with a copy from the CPU and a data-sized scatter: a CUDA graph cannot
    record it (the lent H200 failed its capture), so a graph run over it refuses and says which layer."""
    from workbench.compression.base import apply_compression
    from workbench.models import LoadedModel
    from workbench.models.static_step import _capture_refusal
    from workbench.spec import TechniqueSpec

    model = random_model("llama")
    assert _capture_refusal(model) is None
    apply_compression(LoadedModel(model, None, model.config, "tiny", "tiny", torch.float32, torch.device("cpu")),
                      [TechniqueSpec.parse("prune")])
    assert "cannot be captured" in _capture_refusal(model) and "SparseLinear" in _capture_refusal(model)
