"""The Generate tab: one prompt, one to four configurations racing step by step, and the live views."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import gradio as gr

from workbench.errors import PromptError, WorkbenchError
from workbench.spec import RunSpec
from workbench.trace import Trace
from workbench.views import figures as views
from workbench.views.kv import METRICS, shape
from workbench.views.live import LiveText, race
from workbench.views.tokens import kept_mask_html, stats_markdown, tokens_html

from .context import MAX_COLUMNS, MAX_NEW_TOKENS, MAX_PROMPT_CHARS, AppContext
from .controls import ColumnControls, build_column_controls, wire_column_controls

DEFAULT_SPECS = ["decode=plain", "decode=prompt_lookup", "decode=token_recycling", "decode=plain;temperature=0.7"]
TEXT_EVERY_S = 0.25  # at most four token updates a second while tokens stream
VIEW_EVERY_S = 1.0  # and at most one redrawn figure a second, in an update of its own
# Groups of views (indexes into `view_outputs`: tree, acceptance, tokens per step, speed and memory, KV
# heatmap and kept mask, step slider). While tokens stream, one group is redrawn at a time, in turn, never in
# the same update as the tokens: a browser draws each update in one task, and a Plotly redraw beside three
# columns of tokens made tasks of 200-300 ms (docs/app.md, "Rendering"). After the race each group comes
# as its own update, the slider with the tree.
LIVE_GROUPS = ((0,), (1,), (2,), (3,), (4, 5))
VIEW_GROUPS = ((0, 6), (1,), (2,), (3,), (4, 5))


@dataclass
class Column:
    controls: ColumnControls
    box: gr.Column
    html: gr.HTML
    stats: gr.Markdown
    links: gr.Markdown
    stop: gr.Button


@dataclass
class GenerateTab:
    prompt: gr.Textbox
    chat: gr.Checkbox
    max_new_tokens: gr.Slider
    n_columns: gr.Radio
    run: gr.Button
    stop_all: gr.Button
    status: gr.Markdown
    columns: list[Column]
    view_column: gr.Radio
    step: gr.Slider
    metric: gr.Radio
    layer: gr.Number
    head: gr.Number
    tree: gr.Plot
    acceptance: gr.Plot
    lengths: gr.Plot
    timeline: gr.Plot
    kv: gr.Plot
    kept: gr.HTML
    runs: gr.State  # per column: {"label", "trace", "error", "status"}

    def column_outputs(self) -> list[Any]:
        return [c for col in self.columns for c in (col.html, col.stats, col.links)]

    def view_outputs(self) -> list[Any]:
        return [self.tree, self.acceptance, self.lengths, self.timeline, self.kv, self.kept, self.step]

    def run_outputs(self) -> list[Any]:
        """What a generation (or an opened run) sets: columns, views, the runs state and the status line."""
        return self.column_outputs() + self.view_outputs() + [self.runs, self.status]

    def view_inputs(self) -> list[Any]:
        return [self.runs, self.view_column, self.step, self.metric, self.layer, self.head]


# On a narrow screen the columns stack; each column's controls would then stand between one column's tokens
# and the next. The columns' boxes dissolve there (display: contents) so that every column's controls come
# first and the race's outputs follow one another, each labelled and edged in its column's colour; the
# provenance line is left to the run link.
LAYOUT_CSS = """
@media (max-width: 640px) {
  #wb-columns {flex-direction: column}
  #wb-columns > .wb-column:not(.hidden) {display: contents}
  #wb-columns .wb-column-controls {order: 1}
  #wb-columns .wb-column-output {order: 2}
  #wb-columns [id^="wb-stats-"] sub {display: none}  /* provenance: the run link has it */
""" + "".join(f"  #wb-tokens-{i + 1}::before {{content: 'configuration {i + 1}'; font-weight: 600; font-size: 13px}}\n"
              for i in range(MAX_COLUMNS)) + "}\n"

MAX_LINK_PROMPT = 6000  # characters of the URL-encoded prompt a comparison link carries


def spec_link(spec_text: str) -> str:
    return f"?spec={quote(spec_text, safe='')}"


def comparison_link(prompt_text: str, chat: bool, specs: list[str], max_new_tokens: int) -> str:
    """Markdown: the link that reopens this comparison (prompt, chat setting, every column's spec, max new
    tokens), or says why the prompt is left out of it."""
    prompt = quote(prompt_text or "", safe="")
    params = [f"spec={quote(s, safe='')}" for s in specs] + [f"chat={int(bool(chat))}",
                                                                 f"max_new_tokens={int(max_new_tokens)}"]
    note = ""
    if len(prompt) <= MAX_LINK_PROMPT:
        params.insert(0, f"prompt={prompt}")
    else:
        note = f" (without the prompt: {len(prompt_text)} characters is too long for a link)"
    return f"[link to this comparison](?{'&'.join(params)}){note}"


def column_links(entry: dict[str, Any]) -> str:
    trace: Trace | None = entry.get("trace")
    links = [f"[configuration link]({spec_link(entry['spec'])})"] if entry.get("spec") is not None else []
    if trace is not None and entry.get("recorded") and trace.status != "running":
        links.insert(0, f"[run link](?run={trace.run_id}) (`{trace.run_id}`)")
    return " · ".join(links)


def label_for(ctx: AppContext, trace: Trace | None):
    """Token text from the server's tokenizer; ids alone for a stored run of another model."""
    if trace is None or trace.model == ctx.model_name:
        return ctx.label
    return lambda token: f"<{token}>"


def column_values(ctx: AppContext, entries: list[dict[str, Any]]) -> list[Any]:
    """html, stats and links of every column."""
    out: list[Any] = []
    for i in range(MAX_COLUMNS):
        entry = entries[i] if i < len(entries) else None
        if entry is None:
            out += ["", "", ""]
            continue
        trace = entry.get("trace")
        out += [tokens_html(trace, label_for(ctx, trace), entry.get("error"),
                            show_prompt=entry.get("show_prompt", False)),
                stats_markdown(trace, entry["status"]) if not entry.get("error") else f"**{entry['status']}**",
                column_links(entry)]
    return out


def event_at(trace: Trace, step: int | None):
    if not trace.events:
        return None
    if step is None or step < 0:
        return trace.events[-1]
    return next((e for e in trace.events if e.step == step), trace.events[-1])


def render_views(ctx: AppContext, entries: list[dict[str, Any]], view_column: int | str | None,
                 step: float | None, metric: str, layer: float | None, head: float | None,
                 live: bool = False, only: Sequence[int] | None = None) -> list[Any]:
    """Figures for the views, the step slider's update last; with `only` (indexes into the views), the
    others are left as they are (skipped, and not computed)."""
    named = [(e["label"], e.get("trace")) for e in entries]  # every column, so each keeps its colour
    index = int(view_column or 1) - 1
    entry = entries[index] if 0 <= index < len(entries) else None
    trace: Trace | None = entry.get("trace") if entry else None
    n_steps = len(trace.events) if trace is not None else 0
    at = None if live or step is None else int(step)
    event = event_at(trace, at) if trace is not None else None
    step_now = event.step if event is not None else 0
    layer_i, head_i = int(layer or 0), int(head or 0)

    def tree():
        if event is None:
            return views._empty("draft tree", "run a configuration (or open a run) to see its draft trees")
        previous = next((e for e in reversed(trace.events) if e.step < step_now), None)
        root = previous.tokens[-1] if previous is not None and previous.tokens else None
        return views.tree_figure(event.tree, label_for(ctx, trace), step_now, root,
                                 title=f"{entry['label']}: draft tree")

    def kv():
        if event is None:
            return views.kv_heatmap(None, metric)
        return views.kv_heatmap(event, metric, title=f"{entry['label']}: KV {metric}")

    def kept():
        if event is None:
            return kept_mask_html(None, ctx.label, layer_i, head_i)
        layers, heads = shape(event)
        upto = Trace(**{**trace.__dict__, "events": [e for e in trace.events if e.step <= step_now]})
        return kept_mask_html(upto, label_for(ctx, trace), min(layer_i, max(layers - 1, 0)),
                              min(head_i, max(heads - 1, 0)))

    makers = [tree, lambda: views.acceptance_figure(named), lambda: views.accepted_length_figure(named),
              lambda: views.timeline_figure(named), kv, kept,
              lambda: gr.update(maximum=max(n_steps - 1, 1), value=step_now, interactive=not live)]
    return [make() if only is None or i in only else gr.skip() for i, make in enumerate(makers)]


def live_column_values(ctx: AppContext, entries: list[dict[str, Any]], texts: list[LiveText]) -> list[Any]:
    """`column_values` while the race runs: each column's tokens as its LiveText (only new tokens are sent)."""
    out = column_values(ctx, [{**e, "trace": None} for e in entries])
    for i, (entry, text) in enumerate(zip(entries, texts)):
        if entry.get("trace") is not None and not entry.get("error"):
            out[3 * i] = text.update(entry["trace"])
            out[3 * i + 1] = stats_markdown(entry["trace"], entry["status"])
    return out


class Screen:
    """What each output of a generation shows now. Gradio streams each yield as its difference from the
    previous one, so a value sent again unchanged costs nothing on the wire or in the browser, while every
    yield stays complete (a client that reads only the last one, such as gradio_client, gets everything)."""

    def __init__(self, n: int):
        self.values: list[Any] = [gr.skip()] * n

    def show(self, values: list[Any]) -> list[Any]:
        """`values` with each gr.skip() replaced by what that output shows already."""
        for i, value in enumerate(values):
            if not (isinstance(value, dict) and value == {"__type__": "update"}):
                self.values[i] = value
        return list(self.values)


def parse_prompt(text: str) -> str | list[dict[str, str]]:
    """Plain text, or chat messages given as a JSON list of {"role", "content"} objects."""
    if text is None or not text.strip():
        raise PromptError("the prompt is empty: type some text to continue, or a question")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(f"the prompt has {len(text)} characters; the app takes at most {MAX_PROMPT_CHARS}")
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            messages = json.loads(stripped)
        except json.JSONDecodeError:
            return text
        if isinstance(messages, list) and messages and all(
                isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(v, str) for v in m.values())
                for m in messages):
            return messages
    return text


def make_generate(ctx: AppContext):
    def generate(prompt_text: str, chat: bool, max_new_tokens: float, n_columns: Any, spec1: str, spec2: str,
                 spec3: str, spec4: str, view_column: Any, metric: str, layer: float, head: float,
                 request: gr.Request):
        specs = [spec1, spec2, spec3, spec4]
        n = min(max(int(n_columns or 1), 1), MAX_COLUMNS)
        session = getattr(request, "session_hash", None) or "anonymous"
        ctx.clear_stops(session)
        entries: list[dict[str, Any]] = []
        lanes_specs: list[str] = []
        try:
            prompt = parse_prompt(prompt_text)
        except WorkbenchError as err:
            gr.Warning(str(err))
            yield [gr.skip()] * (3 * MAX_COLUMNS + 7) + [gr.skip(), f"**error:** {err}"]
            return
        for i in range(n):
            entry = {"label": f"#{i + 1}", "trace": None, "error": None, "status": "waiting", "spec": specs[i] or "",
                     "recorded": ctx.store is not None}
            try:
                ctx.check_spec(specs[i])
                spec = RunSpec.parse(specs[i] or "")
                extras = "".join(f"+{c.name}" for c in spec.cache + spec.compress)
                entry["label"] = f"#{i + 1} {spec.decode.name}{extras}"
            except WorkbenchError as err:
                entry.update(error=f"spec error: {err}", status="failed")
            entries.append(entry)
            lanes_specs.append(specs[i] or "")
        for entry in entries:
            if entry["error"]:
                gr.Warning(f"{entry['label']}: {entry['error']}")
        runnable = [i for i, e in enumerate(entries) if not e["error"]]
        chat_override = {} if chat else {"chat": False}
        last_text, last_view = 0.0, time.monotonic()  # tokens show at once, the first view a second later
        turn = 0
        screen = Screen(3 * MAX_COLUMNS + 9)
        texts = [LiveText(label_for(ctx, None)) for _ in entries]
        stream = race(ctx.wb, prompt, [lanes_specs[i] for i in runnable],
                      lambda lane: ctx.stopped(session, runnable[lane]),
                      max_new_tokens=int(max_new_tokens), **chat_override)
        no_columns, no_views = [gr.skip()] * (3 * MAX_COLUMNS), [gr.skip()] * 7
        for lanes in stream:
            for lane in lanes:
                entry = entries[runnable[lane.index]]
                entry.update(trace=lane.trace, status=lane.status, error=lane.error)
            now = time.monotonic()
            if now - last_text >= TEXT_EVERY_S:
                last_text = now
                yield screen.show(live_column_values(ctx, entries, texts) + no_views + [entries, "running…"])
            elif now - last_view >= VIEW_EVERY_S:
                last_view = now
                group = LIVE_GROUPS[turn % len(LIVE_GROUPS)]
                turn += 1
                yield screen.show(no_columns + render_views(ctx, entries, view_column, None, metric, layer, head,
                                                            live=True, only=group) + [entries, gr.skip()])
        for entry in entries:
            if entry["error"]:
                gr.Warning(f"{entry['label']}: {entry['error']}")
        failed = sum(1 for e in entries if e["error"])
        stopped = sum(1 for e in entries if e["status"] == "stopped")
        status = f"done: {len(entries) - failed} of {len(entries)} configurations ran"
        if stopped:
            status += f"; {stopped} stopped early"
        if failed:
            status += f"; {failed} failed (see the column)"
        status += " · " + comparison_link(prompt_text, chat, [e["spec"] for e in entries], max_new_tokens)
        # The final text first (it says which KV entries are held), then one update per group of views.
        yield screen.show(column_values(ctx, entries) + [gr.skip()] * 7 + [entries, "drawing the views…"])
        for k, group in enumerate(VIEW_GROUPS):
            last = k == len(VIEW_GROUPS) - 1
            yield screen.show([gr.skip()] * (3 * MAX_COLUMNS)
                              + render_views(ctx, entries, view_column, None, metric, layer, head, only=group)
                              + [entries, status if last else gr.skip()])

    return generate


def build_generate_tab(ctx: AppContext) -> GenerateTab:
    with gr.Row():
        prompt = gr.Textbox(label="prompt (plain text, or chat messages as a JSON list of {role, content})", lines=3,
                            value="Summarise: the quick brown fox jumps over the lazy dog. The quick brown fox",
                            scale=4, elem_id="wb-prompt")
        with gr.Column(scale=1):
            chat = gr.Checkbox(value=True, label="chat template (when the model has one)")
            max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=64, step=1, label="max new tokens",
                                       info=f"1 to {MAX_NEW_TOKENS}, for every column (a link asking more is set to "
                                            f"{MAX_NEW_TOKENS}, saying so)")
            n_columns = gr.Radio([1, 2, 3, 4], value=2, label="configurations side by side", elem_id="wb-column-count")
    with gr.Row():
        run = gr.Button("Generate", variant="primary", elem_id="wb-generate")
        stop_all = gr.Button("Stop all", variant="stop")
    status = gr.Markdown("", elem_id="wb-status")
    columns = []
    with gr.Row(equal_height=False, elem_id="wb-columns"):
        for i in range(MAX_COLUMNS):
            with gr.Column(visible=i < 2, min_width=260, elem_classes=["wb-column"]) as box:
                with gr.Column(elem_classes=["wb-column-controls"]):
                    gr.Markdown(f"#### configuration {i + 1}")
                    controls = build_column_controls(i, DEFAULT_SPECS[i])
                with gr.Column(elem_classes=["wb-column-output"]):
                    html = gr.HTML(elem_id=f"wb-tokens-{i + 1}")
                    stats = gr.Markdown(elem_id=f"wb-stats-{i + 1}")
                    links = gr.Markdown(elem_id=f"wb-links-{i + 1}")
                    stop = gr.Button(f"Stop {i + 1}", size="sm", variant="stop")
            columns.append(Column(controls, box, html, stats, links, stop))
    gr.Markdown("### Views")
    with gr.Row():
        view_column = gr.Radio([1, 2, 3, 4], value=1, label="tree and KV views show configuration",
                               elem_id="wb-view-column")
        step = gr.Slider(0, 1, value=0, step=1, label="step (replay after the run)", interactive=False,
                         elem_id="wb-step")
    # The views open with their empty figures, so the browser loads the plotting library with the page
    # rather than in the middle of the first race.
    empty = render_views(ctx, [], 1, None, "tokens", 0, 0, only=range(5))
    with gr.Row():
        tree = gr.Plot(empty[0], label="draft tree", elem_id="wb-tree")
        acceptance = gr.Plot(empty[1], label="acceptance", elem_id="wb-acceptance")
    with gr.Row():
        lengths = gr.Plot(empty[2], label="tokens per step", elem_id="wb-lengths")
        timeline = gr.Plot(empty[3], label="speed and memory", elem_id="wb-timeline")
    with gr.Row():
        metric = gr.Radio(list(METRICS), value="tokens", label="KV heatmap shows")
        layer = gr.Number(value=0, precision=0, minimum=0, label="layer (kept-token mask)")
        head = gr.Number(value=0, precision=0, minimum=0, label="kv head (kept-token mask)")
    with gr.Row():
        kv = gr.Plot(empty[4], label="KV cache", elem_id="wb-kv")
        kept = gr.HTML(elem_id="wb-kept")
    runs = gr.State([])
    return GenerateTab(prompt, chat, max_new_tokens, n_columns, run, stop_all, status, columns, view_column, step,
                       metric, layer, head, tree, acceptance, lengths, timeline, kv, kept, runs)


def wire_generate_tab(ctx: AppContext, tab: GenerateTab) -> None:
    for col in tab.columns:
        wire_column_controls(col.controls)
    tab.n_columns.change(lambda n: [gr.update(visible=i < int(n)) for i in range(MAX_COLUMNS)],
                         inputs=tab.n_columns, outputs=[c.box for c in tab.columns], api_visibility="private")
    inputs = [tab.prompt, tab.chat, tab.max_new_tokens, tab.n_columns] + [c.controls.spec for c in tab.columns] + [
        tab.view_column, tab.metric, tab.layer, tab.head]
    # One engine call at a time: every generation shares the "engine" queue slot; other tabs use their own.
    tab.run.click(make_generate(ctx), inputs=inputs, outputs=tab.run_outputs(), api_name="generate",
                  concurrency_limit=1, concurrency_id="engine", show_progress="hidden")

    def stop_one(i: int):
        def stop(request: gr.Request):
            ctx.stop(getattr(request, "session_hash", None) or "anonymous", i)
        return stop

    for i, col in enumerate(tab.columns):
        col.stop.click(stop_one(i), api_visibility="private", concurrency_limit=None, queue=False)

    def stop_all(request: gr.Request):
        for i in range(MAX_COLUMNS):
            ctx.stop(getattr(request, "session_hash", None) or "anonymous", i)

    tab.stop_all.click(stop_all, api_name="stop_all", concurrency_limit=None, queue=False)

    def redraw(runs, view_column, step, metric, layer, head):
        return render_views(ctx, runs or [], view_column, step, metric, layer, head)

    def show_column(runs, view_column, step, metric, layer, head):  # another column opens at its last step
        return render_views(ctx, runs or [], view_column, None, metric, layer, head)

    tab.view_column.change(show_column, inputs=tab.view_inputs(), outputs=tab.view_outputs(),
                           api_visibility="private", show_progress="hidden", concurrency_id="views",
                           concurrency_limit=4)
    for trigger in (tab.step.release, tab.metric.change, tab.layer.change, tab.head.change):
        trigger(redraw, inputs=tab.view_inputs(), outputs=tab.view_outputs(), api_visibility="private",
                show_progress="hidden", concurrency_id="views", concurrency_limit=4)
