"""The Gradio app (`workbench app`): side-by-side generation with live views, the run store, SQL, permalinks.

Files: `server.py` (build and serve), `context.py` (model, store, stops), `generate_tab.py`, `runs_tab.py`,
`sql_tab.py`, `permalinks.py`, `controls.py` (forms from the registry), `presets.py`, `live.py` (the
round-robin race), `replay.py` (stored run -> Trace), and the pure renderers `views.py` (plotly),
`tokens.py` (HTML) and `kv.py`. See docs/app.md.
"""
