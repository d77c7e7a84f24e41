"""The Runs tab's sweep panel: a sweep recorded in the store drawn as a Pareto plot, through gradio_client and
in a real browser (headless Chromium), where clicking a point selects that configuration's runs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

from workbench.apps.context import AppContext  # noqa: E402
from workbench.apps.server import launched_locally  # noqa: E402
from workbench.store import Store  # noqa: E402
from workbench.sweep import Grid, make_executor, run_sweep  # noqa: E402

PROMPTS = ["5 6 7 8 5 6 7 8", "9 10 11 9 10 11"]  # the random model takes token ids


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A store holding one 2-configuration sweep (4 cells), then the app on it."""
    path = tmp_path_factory.mktemp("sweeps") / "runs.duckdb"
    grid = Grid(name="two drafters", specs=["", "decode=prompt_lookup:k=4"], prompts=PROMPTS, max_new_tokens=6,
                model="random:llama", dtype="float32")
    with Store(path) as store:
        report = run_sweep(grid, make_executor(grid), store, progress=False)
        runs = store.query("SELECT spec, run_id FROM sweep_cells ORDER BY spec").to_pylist()
    assert report.done == 4
    ctx = AppContext.create("random:llama", "float32", "cpu", path)
    try:
        with launched_locally(ctx) as (_, url):
            yield SimpleNamespace(url=url, client=Client(url, verbose=False), sweep_id=report.sweep_id, runs=runs)
    finally:
        ctx.close()


def test_a_sweep_is_drawn_one_point_per_configuration(app):
    plot, table, message = app.client.predict(app.sweep_id, "peak_cache_bytes", api_name="/sweep_plot")
    figure = json.loads(plot["plot"])
    points = [t for t in figure["data"] if t["mode"] == "markers"]
    assert sorted(p["name"] for p in points) == ["decode=prompt_lookup:k=4", "plain"]  # shared fields left out
    assert all(len(p["customdata"][0][0].split(",")) == 2 for p in points)  # each point holds its 2 runs
    assert table["headers"][:2] == ["configuration", "tok_per_s"] and len(table["data"]) == 2
    assert message == "2 configurations, 4 finished cells"
    _, _, refused = app.client.predict("x' OR 1=1", "peak_cache_bytes", api_name="/sweep_plot")
    assert "bad sweep id" in refused


def test_picking_a_point_selects_its_runs_and_the_first_to_open(app):
    ids = [r["run_id"] for r in app.runs if r["spec"] == app.runs[0]["spec"]]
    selected, open_id, message = app.client.predict(",".join(ids) + "|1", "all", "all", "", api_name="/sweep_pick")
    assert selected["value"] == ids and open_id == ids[0]
    assert "selected 2 runs" in message
    _, _, refused = app.client.predict("nothex|2", "all", "all", "", api_name="/sweep_pick")
    assert "is not a run id" in refused


@pytest.mark.integration
def test_clicking_a_point_in_the_browser_selects_its_runs(app, chromium):
    page = chromium.new_page(viewport={"width": 1400, "height": 2400})
    page.set_default_timeout(60_000)
    try:
        page.goto(app.url)
        page.get_by_role("tab", name="Runs").click()
        page.wait_for_selector("#wb-sweep-pareto .js-plotly-plot .scatterlayer .point")
        assert "2 configurations, 4 finished cells" in page.locator("#wb-sweep-message").inner_text()
        page.locator("#wb-sweep-pareto .scatterlayer .point").first.click(force=True)
        page.wait_for_function("document.querySelector('#wb-sweep-message')?.innerText.includes('selected 2 runs')")
        opened = page.locator("#wb-open-id textarea, #wb-open-id input").first.input_value()
        assert opened in {r["run_id"] for r in app.runs}
        assert page.locator("#wb-runs-selected").inner_text().count(opened[:8]) == 1
    finally:
        page.close()
