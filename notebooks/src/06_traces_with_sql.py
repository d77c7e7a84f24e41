# Lab 6 source (scripts/make_notebooks.py writes the notebooks from it).
# ruff: noqa: E402
# %% [markdown]
# # Lab 6: traces with SQL
#
# Every run can be recorded as a trace in a DuckDB file (`workbench.store`, docs/store.md): one row per run
# in `runs` (its spec and summary metrics), and its `steps`, `tokens`, `draft_nodes` and `cache_stats`. The
# view `run_summary` puts each run's techniques in columns; `technique_comparison` compares each
# configuration with the plain runs of the same prompt. Comparing techniques is then a query.
#
# This lab records a few runs into a throwaway store, asks questions of them in SQL and plots the answers.
# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

from workbench import Workbench
from workbench.eval.suite import suite
from workbench.labs import check_sql
from workbench.store import Reader, Store

path = Path(tempfile.mkdtemp()) / "lab6.duckdb"  # a throwaway store; your own runs stay where they are
prompts = [p.prompt for p in suite(["summarization"], per_category=1)]
SPECS = ["decode=plain", "decode=prompt_lookup", "decode=token_recycling"]
traces = []
with Store(path) as store:
    wb = Workbench(store=store)
    for prompt in prompts:
        for spec in SPECS:
            traces.append(wb.generate(prompt, spec + ";max_new_tokens=12"))
print(f"{len(traces)} runs recorded in {path}")
# %% [markdown]
# ## Reading the store
#
# `Reader` opens the file read-only; `query` returns an Arrow table (`.to_pylist()`, `.to_pandas()`).
# %%
reader = Reader(path)
print(reader.query("SELECT decode, round(tok_per_s, 1) AS tok_s, mean_accepted_length, target_forwards, "
                   "n_new_tokens FROM run_summary ORDER BY created_at").to_pandas())
# %% [markdown]
# Each accepted draft node is a row of `draft_nodes`; acceptance by depth in the tree is a GROUP BY:
# %%
by_depth = reader.query("""
    SELECT r.decode_name AS decode, d.depth, avg(CAST(d.accepted AS DOUBLE)) AS accepted, count(*) AS nodes
    FROM draft_nodes d JOIN run_summary r USING (run_id)
    GROUP BY ALL ORDER BY decode, depth""").to_pandas()
print(by_depth)
plt.figure(figsize=(5, 3))
for name, group in by_depth.groupby("decode"):
    plt.plot(group["depth"], group["accepted"], "o-", label=name)
plt.xlabel("depth in the draft tree")
plt.ylabel("share of nodes accepted")
plt.legend()
plt.show()
# %% [markdown]
# And each technique against plain decoding on the same prompt, from the `technique_comparison` view:
# %%
print(reader.query("SELECT decode, left(prompt, 30) AS prompt, round(tok_per_s, 1) AS tok_s, "
                   "round(speedup, 2) AS speedup FROM technique_comparison WHERE decode <> 'plain'").to_pandas())
# %% [markdown]
# ## Exercise: one query
#
# Write `QUERY`: the mean `mean_accepted_length` per decoding method over every recorded run, as two
# columns, `decode` (the method's name: `decode_name` in `run_summary`) and `mean_accepted_length`.
# %%
# BEGIN SOLUTION
QUERY = """SELECT decode_name AS decode, avg(mean_accepted_length) AS mean_accepted_length
           FROM run_summary GROUP BY decode_name"""
# END SOLUTION
rows = reader.query(QUERY).to_pylist()
check_sql(rows, traces)
plt.figure(figsize=(4, 2.5))
plt.bar([r["decode"] for r in rows], [r["mean_accepted_length"] for r in rows])
plt.ylabel("tokens per target forward")
plt.show()
# %% [markdown]
# The same queries work on your own runs: `workbench sql "SELECT ..."` reads the default store, and the app's
# SQL tab runs them in the browser. **Questions.** (1) Which steps of the token recycling runs accepted the
# most tokens, and what text did they add (`steps.text`)? (2) Write the query that finds every run whose
# output differs from the plain run of the same prompt (hint: `runs.text`).
# %%
reader.close()
