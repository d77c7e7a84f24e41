"""Views of runs shared by the Gradio app (`workbench.apps`) and the notebook widgets (`workbench.widgets`).

Pure functions of StepEvents and Traces, no Gradio and no ipywidgets: `figures.py` (plotly figures: draft
tree, acceptance, tokens per step, speed and memory, KV heatmap, run comparison), `tokens.py` (HTML of a
run's text coloured by source with hovers, the kept-token mask, the stats line), `kv.py` (what the KV cache
holds at a step), `palette.py` (one colour per configuration), `live.py` (the step-interleaved race of
several configurations and its growing text), `replay.py` (a stored run back as a Trace) and `runs.py`
(labels and filters of the recorded runs).
"""
