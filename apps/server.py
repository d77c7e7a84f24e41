"""Building and serving the app: `workbench app` calls `serve`; tests call `build_app` and launch it on a
free port.

The model is loaded once per server process (`AppContext.create`). Generations share one queue slot
("engine"), so one engine call runs at a time and at most `queue_size` wait; the views, the Runs and the
SQL tabs have their own slots and stay responsive meanwhile. Runs are recorded through one StoreThread,
and the SQL console queries through it (the store's sealed rules apply).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import gradio as gr

from workbench.spec import DEFAULT_MODEL
from workbench.views.tokens import CSS

from .bench_tab import build_bench_tab, wire_bench_tab
from .context import AppContext
from .generate_tab import LAYOUT_CSS, build_generate_tab, wire_generate_tab
from .permalinks import RUN_ADDRESS_JS, link_outputs, open_run, wire_permalinks
from .runs_tab import build_runs_tab, wire_runs_tab
from .sql_tab import build_sql_tab, wire_sql_tab
from .sweep_panel import SWEEP_CLICK_JS

# System fonts only: a page that asks no other server for anything works with no network.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
LAUNCH_STYLE = {"theme": THEME, "css": CSS + LAYOUT_CSS, "js": SWEEP_CLICK_JS}


def build_app(ctx: AppContext) -> gr.Blocks:
    with gr.Blocks(title="workbench", analytics_enabled=False) as demo:
        gr.Markdown(f"## workbench · `{ctx.model_name}` · "
                    + ("runs are recorded in " + f"`{ctx.store.path}`" if ctx.store is not None
                       else "runs are not recorded (--no-store)"))
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                generate = build_generate_tab(ctx)
            with gr.Tab("Runs", id="runs") as runs_tab_block:
                runs = build_runs_tab()
            with gr.Tab("SQL", id="sql"):
                sql = build_sql_tab()
            with gr.Tab("Benchmarks", id="bench") as bench_tab_block:
                bench = build_bench_tab()
        wire_generate_tab(ctx, generate)
        wire_runs_tab(ctx, runs, runs_tab_block.select)
        wire_sql_tab(ctx, sql)
        wire_bench_tab(bench, bench_tab_block.select)
        wire_permalinks(demo, ctx, generate, tabs)

        def open_from_runs(run_id: str):
            return open_run(ctx, generate, run_id)

        runs.open.click(open_from_runs, inputs=runs.open_id, outputs=link_outputs(generate, tabs),
                        api_name="open_run", concurrency_id="store", concurrency_limit=4,
                        ).then(None, inputs=generate.status, js=RUN_ADDRESS_JS, api_visibility="private")
    demo.queue(max_size=ctx.queue_size, default_concurrency_limit=4)
    return demo


@contextmanager
def launched_locally(ctx: AppContext) -> Iterator[tuple[gr.Blocks, str]]:
    """Build the app, serve it on a free localhost port in the background, yield (app, URL), then close it
    (tests and the screenshot script)."""
    demo = build_app(ctx)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH_STYLE)
    try:
        yield demo, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def serve(model: str = DEFAULT_MODEL, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          store: str | None = None, record: bool = True, dtype: str = "auto", device: str = "auto") -> None:
    """Load the model, open the store and serve until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    ctx = AppContext.create(model, dtype, device, store, record)
    try:
        demo = build_app(ctx)
        demo.launch(server_name=host, server_port=port, share=share, footer_links=["api"], **LAUNCH_STYLE)
    finally:
        ctx.close()
