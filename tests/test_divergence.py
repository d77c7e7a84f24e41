"""Per-token divergence from plain decoding: the engine records the target's argmax at every emitted token."""

from types import SimpleNamespace

import torch

from workbench.decoding.base import Acceptance, Acceptor, DraftTree
from workbench.divergence import departed, divergence
from workbench.engine import Engine
from workbench.spec import RunSpec
from workbench.views.tokens import event_spans

from .helpers import varied_model


class SecondBest(Acceptor):
    """A deliberately lossy acceptor: drafts nothing to accept, and the bonus is the target's second choice."""

    lossless = False

    def accept(self, tree: DraftTree, logits: torch.Tensor, probs: torch.Tensor, sampler) -> Acceptance:
        return Acceptance([], int(probs[0].topk(2).indices[1]))


def _events(acceptor=None):
    model = varied_model()
    spec = RunSpec(max_new_tokens=8)
    return list(Engine(model, spec, acceptor=acceptor).run([1, 2, 3, 4]))


def test_plain_greedy_never_departs():
    events = _events()
    assert all(len(e.target_argmax) == len(e.tokens) for e in events)
    summary = divergence(SimpleNamespace(events=events))
    assert summary["departures"] == 0 and summary["first_departure"] is None
    assert summary["target_perplexity"] >= 1.0


def test_lossy_acceptor_departs_at_every_token_and_the_view_marks_it():
    events = _events(SecondBest())
    assert all(all(departed(e)) for e in events)
    summary = divergence(SimpleNamespace(events=events))
    assert summary["departures"] == sum(len(e.tokens) for e in events) and summary["first_departure"] == 0
    assert summary["departure_rate"] == 1.0
    plain = divergence(SimpleNamespace(events=_events()))
    assert summary["target_perplexity"] > plain["target_perplexity"]  # second choices are less likely
    spans = "".join(event_spans(events[1], str, lambda pos: "held"))
    assert "wb-departed" in spans and "departs from plain decoding" in spans


def test_the_store_keeps_departures_and_replays_them(tmp_path):
    from workbench import Workbench
    from workbench.store import Reader, Store
    from workbench.views.replay import load_trace

    wb = Workbench("random:llama", dtype="float32")
    with Store(tmp_path / "runs.duckdb") as store:
        wb.store = store
        trace = wb.generate("5 6 7 8", "max_new_tokens=6")
        row = store.con.execute("SELECT departures, departure_rate, target_perplexity FROM run_summary").fetchone()
        assert row[0] == 0 and row[1] == 0.0 and row[2] == trace.summary()["target_perplexity"]
        argmax = store.con.execute("SELECT target_argmax FROM tokens WHERE source != 'prompt' ORDER BY position")
        assert [r[0] for r in argmax.fetchall()] == trace.token_ids
    with Reader(tmp_path / "runs.duckdb") as reader:
        replayed = load_trace(reader.query, trace.run_id)
        assert [a for e in replayed.events for a in e.target_argmax] == trace.token_ids
