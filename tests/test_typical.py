"""Typical acceptance (Medusa, sec. 2.3.1): the longest typical prefix over all candidate paths, exact at
temperature 0, typical rather than exact when sampling."""

import pytest
import torch

from workbench.decoding.base import DraftTree
from workbench.decoding.typical import TypicalAcceptance
from workbench.engine import Engine
from workbench.sampling import Sampler
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import varied_model

pytestmark = pytest.mark.usefixtures("one_thread")

V = 8
P0 = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.10, 0.08, 0.05, 0.02])  # flat: threshold 0.3 * exp(-1.9) = 0.045
SURE = torch.tensor([0.93, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01])  # confident: only token 0 is typical
SAMPLING = Sampler(temperature=1.0, seed=0)


def accept(tree: DraftTree, rows: list[torch.Tensor], sampler: Sampler = SAMPLING, **params):
    probs = torch.stack(rows)
    return TypicalAcceptance(**params).accept(tree, probs.log(), probs, sampler)


def test_sampling_accepts_likely_tokens_that_are_not_the_argmax():
    tree = DraftTree([1, 7], [-1, -1])  # two siblings: 1 is likely under P0 (0.20), 7 is not (0.02)
    assert accept(tree, [P0, SURE, SURE]).accepted == [0]  # 1 is not P0's argmax (0 is): lossy by design
    rejected = accept(DraftTree([7], [-1]), [P0, SURE])  # 0.02 is below min(0.09, 0.045)
    assert rejected.accepted == []


def test_the_longest_accepted_prefix_wins_over_the_first_passing_child():
    # root -> 1 (typical, then 5: atypical under SURE) and root -> 2 (typical, then 0, then 0: typical)
    tree = DraftTree([1, 5, 2, 0, 0], [-1, 0, -1, 2, 3])
    rows = [P0, SURE, SURE, SURE, SURE, SURE]
    assert accept(tree, rows).accepted == [2, 3, 4]  # the paper's rule
    assert accept(tree, rows, path="first").accepted == [0]  # the option that walks into the first child


def test_ties_go_to_the_most_likely_path():
    tree = DraftTree([2, 1, 0, 0], [-1, -1, 0, 1])  # 2 (p 0.15) and 1 (p 0.20), each followed by a typical 0
    assert accept(tree, [P0, SURE, SURE, SURE, SURE]).accepted == [1, 3]


def test_at_temperature_0_only_the_argmax_is_accepted():
    tree = DraftTree([1, 0, 0], [-1, -1, 1])  # 1 is typical at T = 1 but not the argmax; 0 is
    greedy = accept(tree, [P0, SURE, P0, SURE], Sampler())
    assert greedy.accepted == [1, 2] and greedy.bonus == 0


@pytest.mark.parametrize("decode", [
    TechniqueSpec("token_recycling", {"widths": "3-2-1"}),
    TechniqueSpec("lookahead"),
])
@pytest.mark.parametrize("path", ["longest", "first"])
def test_at_temperature_0_the_output_is_plain_decodings(decode, path):
    """Exact at temperature 0, so a run with it is lossless; on these flat random models the old rule (the
    T = 1 threshold under greedy decoding) accepted other tokens."""
    model = varied_model()
    prompts = [[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6],
               [int(t) for t in torch.randint(3, 500, (30,), generator=torch.Generator().manual_seed(0))]]
    spec = RunSpec(max_new_tokens=40, decode=decode, accept=TechniqueSpec("typical", {"path": path}))
    plain = [[t for e in Engine(model, RunSpec(max_new_tokens=40)).run(p) for t in e.tokens] for p in prompts]
    runs = [list(Engine(model, spec).run(p)) for p in prompts]
    assert [[t for e in events for t in e.tokens] for events in runs] == plain
    assert sum(e.n_accepted for events in runs for e in events) > 0  # drafts were accepted, not just refused
    assert spec.validated().lossless


def test_sampled_runs_are_labelled_lossy():
    assert not RunSpec.parse("decode=prompt_lookup;accept=typical;temperature=0.7").validated().lossless
    assert RunSpec.parse("decode=prompt_lookup;accept=typical").validated().lossless
