"""Race: one to four configurations generating side by side in a notebook, step by step.

The configurations advance in turn, one step each, through the app's race (`workbench.views.live.race`,
which times each lane's own steps), in a background thread so the notebook stays usable. A few times a
second (`every_s`) each column's new tokens are appended to its token stream (coloured by source, hover
for ids, probabilities and the draft's q and p), its line of figures (tok/s, mean accepted length, KV
bytes) is rewritten, and the speed-and-memory figure's data are updated in place. Stop ends every lane
before its next step; `race.traces` holds each run's Trace afterwards (None for a configuration that
failed before its first step), and `race.wait()` blocks until the race ends (scripts, tests).
"""

from __future__ import annotations

import dataclasses
import html
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as w
import plotly.graph_objects as go

from workbench.api import Prompt, Workbench
from workbench.spec import RunSpec
from workbench.trace import Trace
from workbench.views.figures import timeline_figure
from workbench.views.live import Lane, LiveText, race
from workbench.views.palette import column_color
from workbench.views.tokens import stats_markdown, token_labeler, tokens_html

from .common import STYLE, markdown_html, set_figure, workbench_for
from .token_stream import TokenStream

MAX_SPECS = 4


class Race:
    """`Race(prompt, specs=[...])` starts racing at once and shows itself as a notebook cell's output.

    specs: RunSpecs, spec strings (`"decode=prompt_lookup:k=8"`) or SpecBuilders, one to four.
    wb: the Workbench to run on (default: one per `model`, kept for the notebook's life).
    overrides: spec fields applied to every configuration (e.g. `max_new_tokens=64`, `ignore_eos=True`).
    every_s: seconds between screen updates of the text and figures lines (0: after every round of steps).
    figure_every_s: seconds between updates of the speed-and-memory figure, which costs more to redraw.
    on_update: called with the race after each screen update, in the race's thread.
    """

    def __init__(self, prompt: Prompt, specs: Sequence[RunSpec | str | Any], *, wb: Workbench | None = None,
                 model: str | None = None, every_s: float = 0.25, figure_every_s: float = 1.0, start: bool = True,
                 on_update: Callable[[Race], None] | None = None, **overrides: Any):
        # a SpecBuilder as its string: the fields it leaves at their defaults (the model) are the race's
        specs = [s.spec.to_string() if hasattr(s, "spec") and not isinstance(s, RunSpec | str) else s for s in specs]
        if not 1 <= len(specs) <= MAX_SPECS:
            raise ValueError(f"a race takes one to {MAX_SPECS} configurations; got {len(specs)}")
        self.wb = wb if wb is not None else workbench_for(model)
        self.specs = [self.wb.spec(s, **overrides) for s in specs]  # a bad spec fails here, with its message
        self.prompt, self.every_s, self.figure_every_s, self.on_update = prompt, every_s, figure_every_s, on_update
        self._figure_at = 0.0  # when the figure was last redrawn
        self.label = token_labeler(self.wb.model(dataclasses.replace(self.specs[0], compress=[])))
        self.lanes: list[Lane] = []
        self.error: str | None = None
        self.rounds = 0  # rounds of steps run
        self.updates = 0  # screen updates sent
        self.tokens_shown = 0  # tokens appended to the token streams
        self.started_s = self.ended_s = 0.0  # time.perf_counter() at the start and the end of the race
        self._stop = False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._texts = [LiveText(self.label) for _ in self.specs]
        self.streams = [TokenStream("".join(t.parts)) for t in self._texts]
        self.stats = [w.HTML("waiting") for _ in self.specs]
        heads = [w.HTML(f'<div style="border-left: 4px solid {column_color(i)}; padding-left: 6px">'
                        f"<b>{html.escape(lane_title(s))}</b></div>") for i, s in enumerate(self.specs)]
        columns = [w.VBox([h, t, s], layout=w.Layout(flex="1 1 0", min_width="0", margin="0 4px"))
                   for h, t, s in zip(heads, self.streams, self.stats)]
        self.stop_button = w.Button(description="Stop", icon="stop", button_style="danger")
        self.stop_button.on_click(lambda _: self.stop())
        self.status = w.HTML("")
        self.timeline = go.FigureWidget(timeline_figure([]))
        self.widget = w.VBox([w.HTML(STYLE), w.HBox([self.stop_button, self.status]), w.HBox(columns),
                              self.timeline])
        if start:
            self.start()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    @property
    def traces(self) -> list[Trace | None]:
        """Each configuration's Trace, in order (None where a run failed before it began)."""
        return [lane.trace for lane in self.lanes] + [None] * (len(self.specs) - len(self.lanes))

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._done.is_set()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("this race has already run; make a new Race to run again")
        self.status.value = "running"
        self._thread = threading.Thread(target=self._run, name="workbench-race", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop every configuration before its next step; its trace is kept with status `interrupted`."""
        self._stop = True

    def wait(self, timeout: float | None = None) -> list[Trace | None]:
        """Block until the race ends (or `timeout` seconds pass) and return the traces."""
        if self._thread is None:
            raise RuntimeError("the race has not started: call start()")
        self._done.wait(timeout)
        return self.traces

    @property
    def elapsed_s(self) -> float:
        """Seconds from the start to the end of the race (so far, while it runs)."""
        return ((self.ended_s or time.perf_counter()) - self.started_s) if self.started_s else 0.0

    def _run(self) -> None:
        last, self.started_s = 0.0, time.perf_counter()
        try:
            for lanes in race(self.wb, self.prompt, self.specs, lambda i: self._stop):
                self.lanes, self.rounds = lanes, self.rounds + 1
                now = time.perf_counter()
                if now - last >= self.every_s:
                    self._show()
                    last = now
        except Exception as err:  # shown, not lost in the thread
            self.error = f"{type(err).__name__}: {err}"
        finally:
            try:
                self._show(final=True)
            finally:
                self.ended_s = time.perf_counter()
                self._done.set()

    def _show(self, final: bool = False) -> None:
        """Append each column's new tokens, rewrite its figures line and the timeline's data (in place)."""
        for lane, text, stream, stats in zip(self.lanes, self._texts, self.streams, self.stats):
            status = lane.status if lane.error is None else f"{lane.status}: {lane.error}"
            if lane.trace is not None:
                before = text.seen
                stream.append(text.added(lane.trace))
                self.tokens_shown += sum(len(e.tokens) for e in lane.trace.events[before:])
                if final:  # whether each token's KV entry is still held is known now
                    stream.reset(tokens_html(lane.trace, self.label))
            stats.value = markdown_html(stats_markdown(lane.trace, html.escape(status)))
        now = time.perf_counter()
        if final or now - self._figure_at >= self.figure_every_s:
            named = [(lane_title(s), lane.trace) for s, lane in zip(self.specs, self.lanes)]
            set_figure(self.timeline, timeline_figure(named))
            self._figure_at = now
        self.updates += 1
        if final:
            self.status.value = "stopped" if self._stop else ("error: " + html.escape(self.error)
                                                              if self.error else "done")
            self.stop_button.disabled = True
        if self.on_update is not None:
            self.on_update(self)


def lane_title(spec: RunSpec) -> str:
    """A lane's heading: the spec as written, always naming its decoder (plain decoding's spec string is
    otherwise only its other settings, e.g. "max_new_tokens=12")."""
    text = spec.to_string()
    return text if text.startswith("decode=") else ";".join(filter(None, [f"decode={spec.decode.name}", text]))
