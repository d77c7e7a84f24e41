"""SpecMemo's memory budget: the per-row bytes are the forward's real tensors, trees are cut to fit, output stays
plain decoding's, and a budget that holds no node is refused before the run."""

from __future__ import annotations

import pytest
import torch

from workbench.cache.dense import DenseLayerCache
from workbench.decoding.specmemo import MB, row_bytes
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import PROMPTS, varied_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return varied_model("llama")


def run(model, decode: TechniqueSpec | None = None, prompt=PROMPTS[0]):
    spec = RunSpec(max_new_tokens=30) if decode is None else RunSpec(max_new_tokens=30, decode=decode)
    return list(Engine(model, spec).run(prompt))


def test_row_bytes_are_the_forward_tensors(model):
    cfg = model.config
    cache = DenseLayerCache(cfg.num_kv_heads, cfg.head_dim, model.dtype, model.device, 8)
    before = cache.nbytes()
    cache.append(torch.zeros(cfg.num_kv_heads, 1, cfg.head_dim, dtype=model.dtype),
                 torch.zeros(cfg.num_kv_heads, 1, cfg.head_dim, dtype=model.dtype), torch.zeros(1, dtype=torch.long))
    rows = row_bytes(model, 10)
    assert rows.kv == cfg.num_layers * (cache.nbytes() - before)  # one token's rows in every layer's raw form
    logits = model(torch.tensor([5, 6]), torch.arange(2)).logits
    probs = torch.softmax(logits.float(), -1)
    assert rows.logits == (logits[0].nbytes + probs[0].nbytes)
    # attention scores grow with the keys read: one score per query head per key, in the model's dtype
    item = torch.empty((), dtype=model.dtype).element_size()
    longer = row_bytes(model, 10_000)
    assert longer.activations - row_bytes(model, 9_000).activations == cfg.num_heads * 1000 * item


@pytest.mark.parametrize("decode,params", [("token_recycling", {}), ("dyspec", {"layers": 2})])
def test_trees_fit_the_budget_and_output_stays_plain(model, decode, params):
    plain = [t for e in run(model) for t in e.tokens]
    rows = row_bytes(model, 40).total
    budget_mb = 3.5 * rows / MB  # root + 2 nodes at about this context
    events = run(model, TechniqueSpec(decode, {**params, "budget_mb": budget_mb}))
    assert [t for e in events for t in e.tokens] == plain
    context = len(PROMPTS[0])
    drafted = []
    for e in events[1:]:
        n = e.n_drafted
        assert (n + 1) * row_bytes(model, context + n + 1).total <= budget_mb * MB
        drafted.append(n)
        context += len(e.tokens)
    assert max(drafted) == 2  # the budget, not the drafter, bounded the tree
    free = [e.n_drafted for e in run(model, TechniqueSpec(decode, params))[1:]]
    assert max(free) > 2  # without the budget the same drafter drafts more


def test_the_tree_shrinks_as_the_context_grows(model):
    from workbench.decoding.token_recycling import TokenRecycling

    drafter = TokenRecycling(budget_mb=40 * row_bytes(model, 100).total / MB)
    assert drafter.node_limit(model, 100) > drafter.node_limit(model, 4000) > 0
    assert TokenRecycling().node_limit(model, 100) is None  # no budget: no limit


def test_a_budget_that_holds_no_node_is_refused(model):
    too_small = 1.5 * row_bytes(model, len(PROMPTS[0]) + 2).total / MB
    with pytest.raises(SpecError, match="budget_mb=.* holds no tree node .* need"):
        run(model, TechniqueSpec("token_recycling", {"budget_mb": too_small}))
    with pytest.raises(SpecError, match="budget_mb"):
        RunSpec(decode=TechniqueSpec("token_recycling", {"budget_mb": -1})).validated()
