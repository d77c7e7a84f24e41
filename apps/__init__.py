"""The Gradio app (`workbench app`): side-by-side generation with live views, the run store, SQL, permalinks.

Files: `server.py` (build and serve), `context.py` (model, store, stops), `generate_tab.py`, `runs_tab.py`,
`sql_tab.py`, `permalinks.py`, `controls.py` (forms from the registry) and `presets.py`. The figures, token
HTML, KV grids, the round-robin race and stored runs read back as Traces come from `workbench.views`, which
the notebook widgets (`workbench.widgets`) use too. See docs/app.md.
"""
