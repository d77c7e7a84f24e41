"""The Python API: traces, streaming, run status, and the embedded model end to end."""

import gc

import pytest

from workbench import RunSpec, Workbench
from workbench.errors import PromptError

from . import helpers  # noqa: F401  (registers the failing drafter)

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def wb():
    return Workbench("random:llama", dtype="float32")


def test_freezing_the_collector_is_the_callers_choice():
    """`freeze_gc=True` takes what is alive out of the collector's walks; the default leaves the process's
    collector as it was."""
    gc.unfreeze()
    Workbench("random:llama", dtype="float32")
    assert gc.get_freeze_count() == 0
    Workbench("random:llama", dtype="float32", freeze_gc=True)
    assert gc.get_freeze_count() > 1000  # the modules and libraries loaded so far
    gc.unfreeze()


def test_generate_returns_a_complete_trace(wb):
    trace = wb.generate("5 6 7 8", "max_new_tokens=6")
    assert trace.status == "done" and trace.finish_reason == "length"
    assert trace.prompt_ids == [5, 6, 7, 8] and len(trace.token_ids) == 6
    summary = trace.summary()
    assert summary["n_new_tokens"] == 6 and summary["target_forwards"] == 6
    assert summary["tok_per_s"] > 0 and summary["ttft_s"] > 0
    assert trace.spec.model == "random:llama"  # the workbench's model fills what the string leaves out


def test_stream_yields_the_events_of_the_trace(wb):
    out = []
    events = list(wb.stream("5 6 7 8", RunSpec(max_new_tokens=4), trace_out=out))
    assert out[0].events == events and out[0].status == "done"


def test_a_run_can_keep_its_own_memory_instead_of_the_models(wb):
    spec = "max_new_tokens=6;decode=token_recycling:hot_start=true"
    own: dict = {}
    wb.generate("5 6 7 8", spec, memory=own)
    assert "token_recycling" in own and "token_recycling" not in wb.memory(wb.spec(spec))
    wb.generate("5 6 7 8", spec)
    assert wb.memory(wb.spec(spec))["token_recycling"] is not own["token_recycling"]


def test_a_run_that_fails_midway_is_marked_failed(wb):
    out = []
    with pytest.raises(RuntimeError, match="drafter broke"):
        list(wb.stream("5 6 7 8", "max_new_tokens=10;decode=_test_breaks_at_step_3", trace_out=out))
    assert out[0].status == "failed" and "drafter broke" in out[0].error
    assert len(out[0].events) == 3  # what ran before the failure is kept


def test_an_abandoned_stream_is_marked_interrupted(wb):
    out = []
    stream = wb.stream("5 6 7 8", "max_new_tokens=10", trace_out=out)
    next(stream)
    stream.close()
    assert out[0].status == "interrupted"


def test_prompt_errors(wb):
    with pytest.raises(PromptError, match="empty"):
        wb.generate("  ")
    with pytest.raises(PromptError, match="space-separated token ids"):
        wb.generate("hello")


@pytest.mark.integration
def test_embedded_model_chats_and_stops():
    wb = Workbench()
    trace = wb.generate("What is the capital of France? Answer in one word.", "max_new_tokens=24")
    assert trace.status == "done" and trace.text.strip()
    assert trace.finish_reason in ("eos", "length")
    assert trace.prompt_ids[:1] == [1]  # the chat template's <|im_start|>
    plain = wb.generate("The capital of France is", "max_new_tokens=8;chat=false;stop=.")
    assert plain.finish_reason in ("stop", "length", "eos")
    if plain.finish_reason == "stop":
        assert plain.text.endswith(".")


def test_the_same_spec_gives_the_same_run_by_default():
    """Reproducible by default: nothing a run learns reaches the next unless hot_start asks for it."""
    wb = Workbench("random:llama", dtype="float32")  # its own memory: nothing from the other tests' runs
    spec = "max_new_tokens=16;decode=token_recycling"
    runs = [wb.generate("5 6 7 8 5 6 7 8", spec) for _ in range(3)]
    accepted = [[e.n_accepted for e in t.events] for t in runs]
    assert accepted[0] == accepted[1] == accepted[2]
    assert not any(t.summary()["warm_start"] for t in runs)
    hot = [wb.generate("5 6 7 8 5 6 7 8", spec + ":hot_start=true") for _ in range(2)]
    assert [t.summary()["warm_start"] for t in hot] == [False, True]
