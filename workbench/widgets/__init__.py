"""Jupyter widgets on the app's view functions (`workbench.views`), updated in place while a run goes.

    from workbench.widgets import Race, DraftTreeView, AcceptanceView, KVView, SpecBuilder, RunsBrowser
    race = Race("Write a haiku about caches.", ["decode=plain", "decode=prompt_lookup:k=8"])
    race.wait(); DraftTreeView(race.traces[1]); AcceptanceView(race.traces)

One file per widget: `race.py`, `draft_tree.py`, `acceptance.py`, `kv_view.py`, `spec_builder.py`,
`runs_browser.py`, `sweep_view.py` (a store's sweeps), `roofline_view.py` (a `workbench bench --roofline`
result), `pareto_view.py` (compression bytes against perplexity); `token_stream.py` is the growing token
text, `common.py` what they share. They run on
ipywidgets 8 and plotly's FigureWidget (`pip install -e ".[notebook]"`); see docs/notebooks.md.
"""

from .acceptance import AcceptanceView
from .draft_tree import DraftTreeView
from .kv_view import KVView
from .pareto_view import ParetoView
from .race import Race
from .roofline_view import RooflineView
from .runs_browser import RunsBrowser
from .spec_builder import SpecBuilder
from .sweep_view import SweepView

__all__ = ["AcceptanceView", "DraftTreeView", "KVView", "ParetoView", "Race", "RooflineView", "RunsBrowser",
           "SpecBuilder", "SweepView"]
