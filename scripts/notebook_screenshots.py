"""Screenshots of the teaching labs in JupyterLab (docs/images/lab*.png), taken with Playwright and Debian's
headless Chromium on copies of the solved labs (the committed notebooks are never written to).

    python scripts/notebook_screenshots.py                 # lab 2's widget cell, lab 1 run top to bottom
    python scripts/notebook_screenshots.py --out /tmp/shots

tests/test_notebooks_browser.py uses `jupyterlab` and `run_widget_cell` from here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "notebooks" / "solutions"
LAB2 = "02_speculative_decoding.ipynb"
WIDGET_CELL = "Race("  # the text that identifies lab 2's widget cell


@contextlib.contextmanager
def jupyterlab(root: Path) -> Iterator[str]:
    """A JupyterLab server on a free localhost port serving `root`, token disabled; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.root_dir={root}", "--IdentityProvider.token=", "--ServerApp.password=",
         "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--allow-root",
         f"--LabApp.workspaces_dir={root / '.workspaces'}", f"--LabApp.user_settings_dir={root / '.settings'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=root,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(root / ".runtime")})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/api/status", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError("jupyter lab exited: " + server.stderr.read().decode()[-2000:]) from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(30)


def solved_copies() -> Path:
    """A temporary folder holding copies of the solved labs."""
    root = Path(tempfile.mkdtemp(prefix="labs-"))
    for path in SOLUTIONS.glob("*.ipynb"):
        shutil.copy(path, root / path.name)
    return root


def open_notebook(page, url: str, name: str) -> None:
    """Open a notebook and wait for its kernel (accepting the preferred kernel if JupyterLab asks)."""
    page.goto(f"{url}/lab/tree/{name}")
    page.wait_for_function("window.jupyterapp && document.querySelector('.jp-Notebook')")
    with contextlib.suppress(Exception):  # no dialog: the notebook names its kernel
        page.locator(".jp-Dialog .jp-mod-accept").click(timeout=5_000)
    # the visible notebook's kernel (JupyterLab may restore other notebooks in background tabs)
    page.wait_for_function("[...document.querySelectorAll(\".jp-Notebook-ExecutionIndicator[data-status='idle']\")]"
                           ".some(e => e.offsetParent !== null)", timeout=180_000)


def run_cell(page, index: int) -> None:
    """Run the notebook's cell `index` alone, as a user would: click into it, Shift+Enter."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.scroll_into_view_if_needed()
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


def run_widget_cell(page, url: str, root: Path) -> None:
    """Open lab 2 and run its widget cell alone; return once its race and draft tree have rendered."""
    cells = nbformat.read(root / LAB2, as_version=4).cells
    index = next(i for i, c in enumerate(cells) if c.cell_type == "code" and WIDGET_CELL in c.source)
    open_notebook(page, url, LAB2)
    run_cell(page, index)
    page.wait_for_function("document.querySelectorAll('.wb-text .wb-tok').length >= 24", timeout=300_000)
    page.wait_for_function("document.body.innerText.includes('draft tree, step')", timeout=120_000)
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 1")
    page.locator(".jp-Cell").nth(index).scroll_into_view_if_needed()


def main() -> None:
    from playwright.sync_api import sync_playwright

    from workbench.apps.render_probe import launch_chromium

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="folder for the PNG files")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = solved_copies()
    with jupyterlab(root) as url, sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1300, "height": 1500})
        page.set_default_timeout(300_000)
        run_widget_cell(page, url, root)
        cell = page.locator(".jp-Cell").filter(has_text="Race(").first
        cell.screenshot(path=str(out / "lab02_race_widgets.png"))
        print(out / "lab02_race_widgets.png")
        page.close()
        page = browser.new_page(viewport={"width": 1300, "height": 1500})  # a fresh page: no unload prompt
        page.set_default_timeout(300_000)
        open_notebook(page, url, "01_decoding_loop.ipynb")
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        # lab 1's one figure comes from its last code cell
        page.wait_for_function("document.querySelectorAll('.jp-OutputArea-output img').length >= 1")
        cell = page.locator(".jp-Cell").filter(has_text="def forward_ms").first
        cell.scroll_into_view_if_needed()
        cell.screenshot(path=str(out / "lab01_forward_cost.png"))
        print(out / "lab01_forward_cost.png")
        browser.close()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
