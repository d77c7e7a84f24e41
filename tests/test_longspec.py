"""LongSpec: lossless, and the draft's view of the cache stays the same size however long the context."""

from __future__ import annotations

import pytest
import torch

from workbench.decoding.base import DecodeState
from workbench.decoding.longspec import LongSpec
from workbench.engine import Engine, build_cache
from workbench.errors import SpecError
from workbench.sampling import Sampler
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import varied_model

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"layers": 2, "sink": 4, "window": 16}


@pytest.fixture(scope="module")
def model():
    return varied_model("llama")


def prompt(n: int) -> list[int]:
    head = [int(t) for t in torch.randint(3, 500, (n - 30,), generator=torch.Generator().manual_seed(n))]
    return head + head[:30]


def run(model, decode: TechniqueSpec | None, ids: list[int], **sampling):
    spec = RunSpec(max_new_tokens=30, **sampling) if decode is None else \
        RunSpec(max_new_tokens=30, decode=decode, **sampling)
    engine = Engine(model, spec)
    events = list(engine.run(ids))
    if decode is not None:
        assert all(e.n_drafted for e in events[1:-1])  # every step but the cut last one verified a tree
    return [t for e in events for t in e.tokens], engine.drafter


@pytest.mark.parametrize("params", [SMALL, {**SMALL, "budget": 4, "per_round": 1}, {**SMALL, "sink": 0}])
def test_greedy_output_equals_plain_with_a_small_view(model, params):
    ids = prompt(150)
    plain, _ = run(model, None, ids)
    ours, drafter = run(model, TechniqueSpec("longspec", params), ids)
    assert ours == plain
    assert drafter.draft_cache_bytes > 0


def test_sampled_output_equals_plain_with_the_same_seed(model):
    ids = prompt(150)
    sampling = {"temperature": 0.8, "top_p": 0.95, "seed": 4}
    assert run(model, TechniqueSpec("longspec", SMALL), ids, **sampling)[0] == run(model, None, ids, **sampling)[0]


def test_the_draft_view_does_not_grow_with_the_context(model):
    sizes = [run(model, TechniqueSpec("longspec", SMALL), prompt(n))[1].draft_cache_bytes for n in (120, 400)]
    assert sizes[0] == sizes[1]
    drafter = LongSpec(**SMALL)
    state = _state(model, prompt(120))
    drafter.begin(state)
    held = drafter._view(state).layers[0].positions[0]
    assert held.tolist() == list(range(4)) + list(range(120 - 16, 120))  # the sinks, then the recent window


def _state(model, ids):
    """A decode state over a cache holding the prompt, as after the prefill."""
    cache = build_cache(model, [], len(ids) + 8)
    model(torch.tensor(ids), torch.arange(len(ids)), cache)
    cache.commit()
    return DecodeState(model, cache, Sampler(), ids, generated=[5])


def test_a_draft_as_deep_as_the_target_is_refused(model):
    with pytest.raises(SpecError, match="layers=4 must be fewer"):
        run(model, TechniqueSpec("longspec", {"layers": 4}), prompt(60))
