"""TriForce: lossless with a retrieval cache far smaller than the context, and the cache holds what it says."""

from __future__ import annotations

import pytest
import torch

from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import varied_model

pytestmark = pytest.mark.usefixtures("one_thread")

SPARSE = {"budget": 16, "chunk": 4, "window": 4, "refresh": 2}


@pytest.fixture(scope="module")
def model():
    return varied_model("llama")


def prompt() -> list[int]:
    head = [int(t) for t in torch.randint(3, 500, (90,), generator=torch.Generator().manual_seed(1))]
    return head + head[:40]  # a repeat, so that the lookup level finds something


def run(model, decode: TechniqueSpec | None = None):
    spec = RunSpec(max_new_tokens=40) if decode is None else RunSpec(max_new_tokens=40, decode=decode)
    return list(Engine(model, spec).run(prompt()))


@pytest.mark.parametrize("params", [SPARSE, {**SPARSE, "lookup": 0}, {**SPARSE, "prefer": "recent"},
                                    {"budget": 24, "chunk": 1, "window": 8}])
def test_greedy_output_equals_plain_with_a_sparse_retrieval_cache(model, params):
    plain = [t for e in run(model) for t in e.tokens]
    events = run(model, TechniqueSpec("triforce", params))
    assert [t for e in events for t in e.tokens] == plain
    assert all(e.tree is not None for e in events[1:])  # every step verified a draft


def test_retrieval_cache_holds_sinks_best_chunks_and_window(model):
    from workbench.decoding.triforce import TriForce

    engine = Engine(model, RunSpec(max_new_tokens=3, decode=TechniqueSpec("triforce", SPARSE)))
    list(engine.run(prompt()))
    drafter = engine.drafter
    assert isinstance(drafter, TriForce)
    held = drafter._cache.layers[0].positions
    n = len(prompt()) + 1
    # budget 16 = sinks (chunk 0) + 2 chosen chunks of 4 + the window's 4 (and what came after the last full chunk)
    assert drafter.retrieval_tokens <= SPARSE["budget"] + SPARSE["chunk"]
    assert (held[:, :4] == torch.arange(4)).all()  # the attention sinks
    assert (held[:, -4:] >= n - 1 - 8).all()  # the recent window
    assert drafter.retrieval_tokens < n // 4


def test_bad_parameters_say_what_is_valid(model):
    with pytest.raises(SpecError, match="budget"):
        RunSpec(decode=TechniqueSpec("triforce", {"budget": 8, "window": 8, "chunk": 4})).validated()
