"""The SQL tab: the store's sealed console (one read-only query; no files, no settings), with examples.
Results show as a table, and as a plot when they have two numeric columns. Queries run under the store's
limits (time, rows, memory: `workbench.store.console.Limits`) off the writer's thread; Cancel stops the
session's running query."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from workbench.errors import WorkbenchError
from workbench.store.console import Cancel, row_limit_note
from workbench.views import figures as views

from .context import AppContext

SHOWN_ROWS = 1000
EXAMPLES = {
    "speed-up over plain decoding": "SELECT decode, cache, round(speedup, 2) AS speedup, "
                                    "round(accepted_length_ratio, 2) AS length_ratio\n"
                                    "FROM technique_comparison ORDER BY speedup DESC",
    "acceptance by tree depth": "SELECT depth, avg(accepted::INT) AS acceptance, count(*) AS nodes\n"
                                "FROM draft_nodes GROUP BY depth ORDER BY depth",
    "tok/s by technique": "SELECT decode, count(*) AS runs, avg(tok_per_s) AS tok_per_s, "
                          "avg(mean_accepted_length) AS accepted_length\nFROM run_summary WHERE status = 'done' "
                          "GROUP BY decode ORDER BY tok_per_s DESC",
    "cache bytes over steps (newest run)": "SELECT step, cache_bytes FROM steps\nWHERE run_id = (SELECT run_id FROM "
                                           "runs ORDER BY created_at DESC LIMIT 1) ORDER BY step",
    "where the time goes": "SELECT decode, avg(draft_s / total_s) AS draft_share, avg(verify_s / total_s) AS "
                           "verify_share\nFROM run_summary WHERE status = 'done' AND total_s > 0 GROUP BY decode",
    "least confident tokens": "SELECT run_id, position, token_id, exp(logprob) AS p, entropy FROM tokens\n"
                              "WHERE source != 'prompt' ORDER BY logprob LIMIT 20",
}


@dataclass
class SqlTab:
    example: gr.Dropdown
    query: gr.Code | gr.Textbox
    run: gr.Button
    cancel: gr.Button
    message: gr.Markdown
    table: gr.Dataframe
    plot: gr.Plot


def _query(ctx: AppContext, sql: str, cancel: Cancel):
    if ctx.store is None:
        return ctx.query(sql)  # says that this app records no runs
    return ctx.store.query(sql, cancel=cancel)


def make_run_query(ctx: AppContext, running: dict[str, Cancel]):
    """The Run handler; `running` maps a browser session to its query's Cancel while the query runs."""

    def run_query(sql: str, request: gr.Request = None):
        if not (sql or "").strip():
            return gr.skip(), gr.update(visible=False), "type a query, or pick an example"
        key, cancel = getattr(request, "session_hash", None), Cancel()
        running[key] = cancel
        try:
            table = _query(ctx, sql, cancel)
        except WorkbenchError as err:
            gr.Warning(str(err))
            return pd.DataFrame(), gr.update(visible=False), f"**{err}**"
        finally:
            if running.get(key) is cancel:
                del running[key]
        data = table.slice(0, SHOWN_ROWS).to_pydict()
        frame = pd.DataFrame(data, columns=table.column_names)
        figure = views.sql_figure(table.column_names, data)
        cut = f" (the first {SHOWN_ROWS} shown)" if table.num_rows > SHOWN_ROWS else ""
        note = row_limit_note(table)
        return (frame, gr.update(value=figure, visible=figure is not None),
                f"{table.num_rows} row{'s' if table.num_rows != 1 else ''}{cut}" + (f"; {note}" if note else ""))

    return run_query


def make_cancel_query(running: dict[str, Cancel]):
    def cancel_query(request: gr.Request = None):
        cancel = running.get(getattr(request, "session_hash", None))
        if cancel is None:
            return "no query is running"
        cancel.cancel()
        return "cancelling the query…"

    return cancel_query


def build_sql_tab() -> SqlTab:
    gr.Markdown("One read-only query over the store: tables `runs`, `steps`, `tokens`, `draft_nodes`, "
                "`cache_stats`; views `run_summary`, `technique_comparison` (see docs/store.md). Writes, files, "
                "extensions and settings are refused.")
    example = gr.Dropdown(list(EXAMPLES), value=None, label="example queries")
    query = gr.Textbox(label="SQL", lines=4, value=EXAMPLES["tok/s by technique"], elem_id="wb-sql")
    with gr.Row():
        run = gr.Button("Run query", variant="primary", elem_id="wb-sql-run")
        cancel = gr.Button("Cancel", variant="stop", elem_id="wb-sql-cancel")
    message = gr.Markdown(elem_id="wb-sql-message")
    table = gr.Dataframe(label="result", interactive=False, max_height=400, elem_id="wb-sql-table")
    plot = gr.Plot(label="first two numeric columns", visible=False, elem_id="wb-sql-plot")
    return SqlTab(example, query, run, cancel, message, table, plot)


def wire_sql_tab(ctx: AppContext, tab: SqlTab) -> None:
    tab.example.input(lambda name: EXAMPLES.get(name, gr.skip()), inputs=tab.example, outputs=tab.query,
                      api_visibility="private")
    running: dict[str, Cancel] = {}
    run_query = make_run_query(ctx, running)
    common = {"concurrency_id": "store", "concurrency_limit": 4}
    tab.run.click(run_query, inputs=tab.query, outputs=[tab.table, tab.plot, tab.message], api_name="sql", **common)
    tab.query.submit(run_query, inputs=tab.query, outputs=[tab.table, tab.plot, tab.message],
                     api_visibility="private", **common)
    # Not in the "store" group: a Cancel must not wait behind the queries it cancels.
    tab.cancel.click(make_cancel_query(running), outputs=tab.message, api_name="sql_cancel",
                     concurrency_id="sql-cancel", concurrency_limit=None)
