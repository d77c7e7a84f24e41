"""Side-by-side runs: configurations advance in turn, one step each, each step timed on its own.

The engine's `elapsed_ns` counts wall time since its run began, which in a race includes the steps the
other configurations took in between. Each lane therefore times its own `next()` calls and rewrites the
events' `elapsed_ns` to its own time (the prefill's own figure plus every later step's), before the
trace is recorded, so tok/s on screen and in the store is what the configuration did alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from workbench.api import Prompt, Workbench
from workbench.engine import StepEvent
from workbench.errors import WorkbenchError
from workbench.spec import RunSpec
from workbench.trace import Trace

from .tokens import LEGEND, Label, event_spans

KV_LATER = "shown when the run ends"  # a token's KV entry may be evicted later: the live text does not say


class LiveText:
    """A column's tokens while its race runs, as a string that only grows: each update adds the spans of the
    steps that arrived since the last one, so Gradio (which streams a string that extends the previous one as
    an append) sends only the new tokens. Whether a token's KV entry is still held changes as a cache evicts,
    so the live spans leave it to the final text (`tokens.tokens_html`)."""

    def __init__(self, label: Label):
        self.label = label
        self.parts = [LEGEND, '<div class="wb-text">']  # left open: the final text closes it
        self.seen = 0  # steps rendered

    def added(self, trace: Trace) -> str:
        """The spans of the steps that arrived since the last call (the notebook's token stream appends these)."""
        new = [span for event in trace.events[self.seen:]
               for span in event_spans(event, self.label, lambda pos: KV_LATER)]
        self.parts += new
        self.seen = len(trace.events)
        return "".join(new)

    def update(self, trace: Trace) -> str:
        self.added(trace)
        return "".join(self.parts)


@dataclass
class Lane:
    """One configuration of a race."""

    index: int
    spec: RunSpec | str
    status: str = "waiting"  # running, done, stopped, failed
    error: str | None = None
    trace: Trace | None = None
    _stream: Iterator[StepEvent] | None = field(default=None, repr=False)
    _out: list[Trace] = field(default_factory=list, repr=False)  # the Workbench puts the trace here
    _own_ns: int = 0

    @property
    def live(self) -> bool:
        return self.status in ("waiting", "running")

    def advance(self) -> None:
        """Run one step (the first call also tokenizes the prompt and prefills)."""
        t0 = time.perf_counter_ns()
        try:
            event = next(self._stream)
        except StopIteration:
            self.status = "done"
            return
        except WorkbenchError as err:  # bad spec or prompt: the user's to fix
            self.status, self.error = "failed", str(err)
            return
        except Exception as err:  # a bug: shown as one line, recorded as a failed run by the Workbench
            self.status, self.error = "failed", f"internal error: {type(err).__name__}: {err}"
            return
        t1 = time.perf_counter_ns()
        self.status, self.trace = "running", self._out[0]
        # The prefill's own figure excludes tokenizing and recording; later steps are timed around next().
        self._own_ns = event.elapsed_ns if event.step == 0 else self._own_ns + (t1 - t0)
        event.elapsed_ns = self._own_ns

    def stop(self) -> None:
        if self.live and self._stream is not None:
            self._stream.close()  # the Workbench records the run as interrupted
        if self.live:
            self.status = "stopped"


def race(wb: Workbench, prompt: Prompt, specs: list[RunSpec | str], stopped: Callable[[int], bool],
         **overrides: object) -> Iterator[list[Lane]]:
    """Advance every configuration one step per round; yield the lanes after each round.

    `stopped(i)` is asked before each step of lane i; a lane that fails does not stop the others.
    `overrides` (spec fields such as max_new_tokens) apply to every configuration.
    """
    lanes = []
    for i, spec in enumerate(specs):
        lane = Lane(i, spec)
        lane._stream = wb.stream(prompt, spec, trace_out=lane._out, **overrides)
        lanes.append(lane)
    try:
        while any(lane.live for lane in lanes):
            for lane in lanes:
                if not lane.live:
                    continue
                if stopped(lane.index):
                    lane.stop()
                    continue
                lane.advance()
                if lane.trace is None and lane._out:  # failed after the trace began: keep what ran
                    lane.trace = lane._out[0]
            yield lanes
    finally:
        for lane in lanes:  # the client went away or the server stopped: record the runs as interrupted
            lane.stop()
