"""A stored run back as a Trace, so the live views can replay it.

What the store does not keep comes back empty and the views say so: the top-k alternatives of each token
(hovers show none), per-layer token counts at steps outside the sampled cache_stats steps, and kept-token
masks (the schema has no column for them yet).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pyarrow as pa

from workbench.engine import StepEvent, TreeRecord
from workbench.errors import StoreError
from workbench.spec import RunSpec
from workbench.trace import Trace

Query = Callable[[str], pa.Table]  # a sealed store query (StoreThread.query)
RUN_ID = re.compile(r"[0-9a-f]{4,32}")


def check_run_id(run_id: str) -> str:
    """Run ids are hex; anything else is refused before it can reach SQL."""
    run_id = (run_id or "").strip().lower()
    if not RUN_ID.fullmatch(run_id):
        raise StoreError(f"{run_id!r} is not a run id: give 4 to 32 hex digits (the Runs tab lists the ids)")
    return run_id


def _rows(query: Query, sql: str) -> list[dict[str, Any]]:
    return query(sql).to_pylist()


def resolve(query: Query, run_id: str) -> dict[str, Any]:
    """The `runs` row of the one run whose id starts with `run_id`."""
    run_id = check_run_id(run_id)
    rows = _rows(query, f"SELECT * FROM runs WHERE starts_with(run_id, '{run_id}') LIMIT 2")
    if len(rows) != 1:
        raise StoreError(f"{'no run' if not rows else 'more than one run'} has an id starting with {run_id!r}")
    return rows[0]


def load_trace(query: Query, run_id: str) -> Trace:
    run = resolve(query, run_id)
    rid = run["run_id"]  # a full id from the store, checked hex above
    where = f"WHERE run_id = '{rid}'"
    tokens = _rows(query, f"SELECT * FROM tokens {where} ORDER BY position")
    steps = _rows(query, f"SELECT * FROM steps {where} ORDER BY step")
    nodes = _rows(query, f"SELECT * FROM draft_nodes {where} ORDER BY step, node")
    cache = _rows(query, f"SELECT * FROM cache_stats {where} ORDER BY step, layer, head")

    by_step: dict[int, list[dict]] = defaultdict(list)
    for t in tokens:
        if t["source"] != "prompt":
            by_step[t["step"]].append(t)
    trees: dict[int, list[dict]] = defaultdict(list)
    for n in nodes:
        trees[n["step"]].append(n)
    kv: dict[int, list[dict]] = defaultdict(list)
    for c in cache:
        kv[c["step"]].append(c)

    events = []
    for s in steps:
        toks = by_step.get(s["step"], [])
        tree_rows = trees.get(s["step"])
        tree = None if not tree_rows else TreeRecord(
            [n["token_id"] for n in tree_rows], [n["parent"] for n in tree_rows], [n["depth"] for n in tree_rows],
            [n["draft_prob"] for n in tree_rows], [n["target_prob"] for n in tree_rows],
            [bool(n["accepted"]) for n in tree_rows])
        event = StepEvent(
            step=s["step"], tokens=[t["token_id"] for t in toks], sources=[t["source"] for t in toks],
            logprobs=[t["logprob"] for t in toks], entropies=[t["entropy"] for t in toks],
            alternatives=[[] for _ in toks], positions=[t["position"] for t in toks], text=s["text"] or "",
            tree=tree, draft_ns=s["draft_ns"], verify_ns=s["verify_ns"], accept_ns=s["accept_ns"],
            elapsed_ns=s["elapsed_ns"], cache_bytes=s["cache_bytes"], cache_tokens=[],
            drafter_forwards=s.get("drafter_forwards") or 0,
            finish_reason=s["finish_reason"], target_argmax=[t.get("target_argmax") for t in toks])
        _attach_cache(event, kv.get(s["step"], []))
        events.append(event)

    prompt = json.loads(run["prompt"]) if run["prompt_is_chat"] else run["prompt"]
    created = run["created_at"]
    return Trace(spec=RunSpec.from_json(run["spec_json"]), prompt=prompt,
                 prompt_ids=[t["token_id"] for t in tokens if t["source"] == "prompt"], model=run["model"],
                 dtype=str(run["dtype"]).removeprefix("torch."), device=run["device"], hardware=run["hardware"] or "",
                 weight_bytes=run["weight_bytes"] or 0, run_id=rid,
                 created_at=created.timestamp() if created is not None else 0.0, events=events,
                 status=run["status"], error=run["error"], warnings=list(run.get("warnings") or []))


def _attach_cache(event: StepEvent, rows: list[dict]) -> None:
    """Per-layer counts from cache_stats; per-head stats (and kept masks, if stored) as event.cache_stats."""
    if not rows:
        return
    layers = max(r["layer"] for r in rows) + 1
    if all(r["head"] is None for r in rows):
        event.cache_tokens = [0] * layers
        for r in rows:
            event.cache_tokens[r["layer"]] = r["tokens_held"]
        return
    heads = max(r["head"] for r in rows if r["head"] is not None) + 1
    grid = {k: [[None] * heads for _ in range(layers)] for k in ("tokens", "bytes", "bits", "sparsity", "kept")}
    for r in rows:
        if r["head"] is None:
            continue
        for key, column in (("tokens", "tokens_held"), ("bytes", "bytes"), ("bits", "bits"),
                            ("sparsity", "sparsity"), ("kept", "kept")):
            grid[key][r["layer"]][r["head"]] = r.get(column)
    event.cache_tokens = [max(h or 0 for h in layer) for layer in grid["tokens"]]
    has_kept = all(h is not None for layer in grid["kept"] for h in layer)
    event.cache_stats = SimpleNamespace(  # type: ignore[attr-defined]
        tokens=grid["tokens"], bytes=grid["bytes"], bits=grid["bits"], sparsity=grid["sparsity"],
        kept=grid["kept"] if has_kept else None, simulated=bool(rows[0].get("simulated")))
