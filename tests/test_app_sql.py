"""The app's SQL tab under attack: a slow query is cancelled from the browser session, and hits limits."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

from workbench.apps.context import AppContext  # noqa: E402
from workbench.apps.server import launched_locally  # noqa: E402

SLOW = "SELECT sum(i) FROM range(1000000000000) t(i)"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    store = tmp_path_factory.mktemp("app_sql") / "runs.duckdb"
    ctx = AppContext.create("random:llama", "float32", "cpu", store)
    try:
        with launched_locally(ctx) as (demo, url):
            yield SimpleNamespace(ctx=ctx, client=Client(url, verbose=False), demo=demo)
    finally:
        ctx.close()


def test_cancel_stops_the_sessions_running_query(app):
    assert app.client.predict(api_name="/sql_cancel") == "no query is running"
    job = app.client.submit(SLOW, api_name="/sql")
    time.sleep(1.0)  # the query is running
    t0 = time.perf_counter()
    assert app.client.predict(api_name="/sql_cancel") == "cancelling the query…"
    _, _, message = job.result(timeout=30)
    assert message == "**query cancelled**" and time.perf_counter() - t0 < 5


@pytest.mark.parametrize("query, message", [
    ("WITH x AS (DELETE FROM runs RETURNING *) SELECT count(*) FROM x", "DELETE inside the query"),
    ("SELECT * FROM pg_settings", "pg_settings is not a table"),
    ("CHECKPOINT", "CALL statements are not allowed"),
    ("EXPLAIN ANALYZE SELECT 1", "EXPLAIN ANALYZE"),
])
def test_the_apps_path_refuses_what_the_console_refuses(app, query, message):
    _, _, shown = app.client.predict(query, api_name="/sql")
    assert message in shown and "\n" not in shown


def test_a_result_cut_at_the_row_limit_says_so(app):
    _, _, message = app.client.predict("SELECT * FROM range(1000000000)", api_name="/sql")
    assert message.startswith("10000 rows (the first 1000 shown); the first 10,000 rows only")
