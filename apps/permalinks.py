"""Permalinks: `?run=ID` reopens a recorded run in the live views; `?spec=...` (repeatable, one per column,
with optional `prompt=`, `chat=` and `max_new_tokens=`) reopens a comparison. Both are served by this app
alone, so they work with no network."""

from __future__ import annotations

import dataclasses
import json
from typing import Any
from urllib.parse import parse_qs

import gradio as gr

from workbench.errors import WorkbenchError
from workbench.spec import RunSpec
from workbench.views.replay import load_trace

from .context import MAX_COLUMNS, MAX_NEW_TOKENS, AppContext
from .generate_tab import GenerateTab, column_values, render_views

# After a run opens from the Runs tab, the address becomes its `?run=` link (read from the status line).
RUN_ADDRESS_JS = """(status) => {
  const m = /opened run `([0-9a-f]+)`/.exec(status || '');
  if (m) history.replaceState(history.state, '', '?run=' + m[1]);
}"""
CHAT_VALUES = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
               "off": False}


def box_spec(spec: RunSpec) -> str:
    """The spec as the app's spec box shows it: no model, dtype or device (the server's), no max_new_tokens
    (the shared slider), no chat (the checkbox); the decoding technique always named, as the presets do."""
    default = RunSpec()
    text = dataclasses.replace(spec, model=default.model, dtype=default.dtype, device=default.device,
                               max_new_tokens=default.max_new_tokens, chat=default.chat).to_string()
    if spec.decode == default.decode:
        text = ";".join(filter(None, [f"decode={default.decode.to_string()}", text]))
    return text


def link_outputs(tab: GenerateTab, tabs: gr.Tabs) -> list[Any]:
    """The tab selector, prompt, chat box, slider, column count, spec boxes, then everything a run sets."""
    return [tabs, tab.prompt, tab.chat, tab.max_new_tokens, tab.n_columns] + [c.controls.spec for c in tab.columns] \
        + tab.run_outputs()


def _skips(tab: GenerateTab) -> list[Any]:
    return [gr.skip()] * (5 + MAX_COLUMNS + len(tab.run_outputs()))


def open_run(ctx: AppContext, tab: GenerateTab, run_id: str, view: tuple = ("tokens", 0, 0)) -> list[Any]:
    """Updates for `link_outputs`: the run in column 1, replayed from its stored trace."""
    try:
        trace = load_trace(ctx.query, run_id)
    except WorkbenchError as err:
        gr.Warning(str(err))
        return _skips(tab)[:-1] + [f"**could not open run:** {err}"]
    prompt = trace.prompt if isinstance(trace.prompt, str) else json.dumps(trace.prompt)
    entry = {"label": f"run {trace.run_id[:8]} {trace.spec.decode.name}", "trace": trace, "error": None,
             "status": f"replayed from the store (status {trace.status}"
                       + (f": {trace.error}" if trace.error else "") + ")",
             "spec": box_spec(trace.spec), "recorded": True, "show_prompt": True}
    entries = [entry]
    metric, layer, head = view
    specs = [entry["spec"]] + [gr.skip()] * (MAX_COLUMNS - 1)
    return ([gr.Tabs(selected="generate"), prompt, trace.spec.chat is not False, trace.spec.max_new_tokens, 1] + specs
            + column_values(ctx, entries) + render_views(ctx, entries, 1, None, metric, layer, head)
            + [entries, f"opened run `{trace.run_id}` ({trace.model}, {trace.dtype}, {trace.device}) from the store; "
                        "drag the step slider to replay it"])


def open_specs(ctx: AppContext, tab: GenerateTab, params: dict[str, list[str]]) -> list[Any]:
    """Updates for `link_outputs`: one column per `spec` parameter, with the link's prompt, chat setting and
    max new tokens."""
    texts = params.get("spec", [])
    problems = []
    if len(texts) > MAX_COLUMNS:
        left_out = ", ".join(f"{i + 1}: {t or '(empty)'}" for i, t in enumerate(texts) if i >= MAX_COLUMNS)
        problems.append(f"the link has {len(texts)} configurations and the app shows at most {MAX_COLUMNS}; "
                        f"left out {left_out}")
        texts = texts[:MAX_COLUMNS]
    boxes: list[Any] = []
    max_new = None
    chat: Any = gr.skip()
    for i, text in enumerate(texts):
        try:
            ctx.check_spec(text)
            spec = RunSpec.parse(text).validated()
            if spec.max_new_tokens != RunSpec.max_new_tokens:
                max_new = spec.max_new_tokens
            if spec.chat is not None:
                chat = spec.chat
            boxes.append(box_spec(spec))
        except WorkbenchError as err:
            problems.append(f"configuration {i + 1}: {err}")
            boxes.append(text)
    if params.get("max_new_tokens"):
        try:
            max_new = int(params["max_new_tokens"][0])
        except ValueError:
            problems.append(f"max_new_tokens={params['max_new_tokens'][0]!r} is not a whole number")
    if max_new is not None and not 1 <= max_new <= MAX_NEW_TOKENS:
        clamped = max(1, min(max_new, MAX_NEW_TOKENS))
        problems.append(f"max_new_tokens={max_new} is outside the app's 1 to {MAX_NEW_TOKENS}; set to {clamped}")
        max_new = clamped
    if params.get("chat"):
        value = params["chat"][0].strip().lower()
        if value in CHAT_VALUES:
            chat = CHAT_VALUES[value]
        else:
            problems.append(f"chat={params['chat'][0]!r} is neither 1 nor 0")
    status = "opened the linked configurations; press Generate to run them"
    if problems:
        for p in problems:
            gr.Warning(p)
        status = "**the link has problems:** " + "; ".join(problems)
    prompt = params["prompt"][0] if params.get("prompt") else gr.skip()
    return ([gr.Tabs(selected="generate"), prompt, chat, gr.skip() if max_new is None else max_new,
             len(texts)] + boxes + [gr.skip()] * (MAX_COLUMNS - len(texts))
            + [gr.skip()] * len(tab.run_outputs()[:-1]) + [status])


def open_link(ctx: AppContext, tab: GenerateTab, query: str) -> list[Any]:
    """Dispatch a page's query string (`run=...` or `spec=...&spec=...`)."""
    params = parse_qs((query or "").lstrip("?"), keep_blank_values=True)
    if params.get("run"):
        return open_run(ctx, tab, params["run"][0])
    if params.get("spec"):
        return open_specs(ctx, tab, params)
    return _skips(tab)


def wire_permalinks(demo: gr.Blocks, ctx: AppContext, tab: GenerateTab, tabs: gr.Tabs) -> None:
    outputs = link_outputs(tab, tabs)

    def on_load(request: gr.Request):
        query = str(getattr(request, "query_params", "") or "")
        return open_link(ctx, tab, query)

    demo.load(on_load, outputs=outputs, api_visibility="private", concurrency_id="views", concurrency_limit=4)
    # The same, as an API endpoint: a client (or a test) hands the query string of a link.
    link = gr.Textbox(visible=False)
    link.submit(lambda q: open_link(ctx, tab, q), inputs=link, outputs=outputs, api_name="open_link",
                concurrency_id="views", concurrency_limit=4)
