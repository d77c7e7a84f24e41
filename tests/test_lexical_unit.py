"""Lexical-unit acceptance: a confident drafted unit is committed unverified (lossy), the rest by the target."""

import pytest
import torch

from workbench.decoding.base import DraftTree
from workbench.decoding.lexical_unit import LexicalUnitAcceptance
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.sampling import Sampler
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import varied_model

pytestmark = pytest.mark.usefixtures("one_thread")

V = 4


def one_hot_rows(choices: list[int]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(choices), V).float() * 5


def q_rows(confidences: list[tuple[int, float]]) -> torch.Tensor:
    q = torch.full((len(confidences), V), 0.0)
    for i, (token, p) in enumerate(confidences):
        q[i] = (1 - p) / (V - 1)
        q[i, token] = p
    return q


def test_the_confident_prefix_is_committed_even_where_the_target_disagrees():
    # the target would pick 0 everywhere; the drafter is sure of 2, 3 and unsure of 1
    tree = DraftTree.chain([2, 3, 1], q_rows([(2, 0.9), (3, 0.85), (1, 0.4)]))
    logits = one_hot_rows([0, 0, 0, 0])
    out = LexicalUnitAcceptance(threshold=0.8).accept(tree, logits, logits.softmax(-1), Sampler())
    assert out.accepted == [0, 1] and out.bonus == 0  # unit [2, 3] unverified, then the target's token
    none = LexicalUnitAcceptance(threshold=0.95).accept(tree, logits, logits.softmax(-1), Sampler())
    assert none.accepted == [] and none.bonus == 0


def test_a_drafter_without_draft_probabilities_is_refused_when_the_spec_is_checked():
    with pytest.raises(SpecError, match="draft distribution, which prompt_lookup does not report"):
        RunSpec.parse("decode=prompt_lookup;accept=lexical_unit").validated()
    assert RunSpec.parse("decode=layer_skip;accept=lexical_unit").validated().accept.name == "lexical_unit"


def test_runs_are_labelled_lossy_and_depart_from_plain_decoding():
    spec = RunSpec(max_new_tokens=24, decode=TechniqueSpec("draft_model", {"layers": 1}),
                   accept=TechniqueSpec("lexical_unit", {"threshold": 0.0}))
    assert not spec.validated().lossless
    model = varied_model()
    prompt = [int(t) for t in torch.randint(3, 500, (20,), generator=torch.Generator().manual_seed(0))]
    plain = [t for e in Engine(model, RunSpec(max_new_tokens=24)).run(prompt) for t in e.tokens]
    events = list(Engine(model, spec).run(prompt))
    tokens = [t for e in events for t in e.tokens]
    assert len(tokens) == 24 and len(events) < 24  # units of several tokens per step
    assert tokens != plain  # a one-layer draft's unverified units are not the target's choices
