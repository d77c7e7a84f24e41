"""Training drafters on the target itself: self-distilled data, a budgeted training loop, cached checkpoints.

`corpus` builds training prompts from Python's standard library (never the benchmark suite's prompts),
`distill` runs the target over them to record its own continuations and last-layer states, `loop` trains a
small module against those under a time budget, and `checkpoints` keeps the result in the workbench cache next
to the model, keyed by the model and the drafter's settings. `workbench train NAME` drives all four.
"""
