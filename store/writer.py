"""The one writer of a store file: runs begin as `running` and finish, whole, in one transaction.

- `Store.begin(trace)` inserts the run as `running`; `Store.finish(trace)` writes its steps, tokens, draft
  nodes and sampled cache stats as Arrow tables and sets its final status and summary metrics, all in one
  transaction, so a reader never sees a half-written run.
- The writer holds DuckDB's file lock while open, so only one process writes a file. A run still marked
  `running` when a writer opens the file was therefore left by a process that died (killed, crashed): the
  writer marks it `interrupted`.
- `StoreThread` serialises writes from many threads through one thread and a queue (the app's case);
  console queries run on the caller's thread, on their own connection, so a slow query never holds up a write.
- A write that fails (disk full, the WAL not creatable) is a one-line StoreError naming the cause, and the run
  is kept as `failed` with that reason where the file still takes the small update.
"""

from __future__ import annotations

import json
import queue
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import duckdb
import pyarrow as pa

from workbench.errors import StoreError

from .database import connect, default_store_path, is_empty, stored_version
from .schema import MIGRATIONS, SCHEMA_VERSION, VIEWS

if TYPE_CHECKING:  # the store reads traces but never needs torch to do so
    from workbench.trace import Trace

    from .console import Cancel, Limits

CACHE_SAMPLE_STEPS = 32  # cache_stats keeps at most this many steps per run, evenly spaced, first and last included
KEPT_STORE_STEPS = 8  # of the steps whose kept positions the engine sampled, at most this many are stored
KEPT_STORE_INTS = 1 << 20  # and at most this many kept positions per run in all

_open_writers: set[Path] = set()  # files this process writes; DuckDB's lock only guards across processes
_open_lock = threading.Lock()


class Recorder(Protocol):
    """What `Workbench(store=...)` calls: `begin` when a run starts, `finish` when it ends, however it ends."""

    def begin(self, trace: Trace) -> None: ...

    def finish(self, trace: Trace) -> None: ...


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc).replace(tzinfo=None)


def sampled_steps(n_steps: int, limit: int = CACHE_SAMPLE_STEPS) -> list[int]:
    """At most `limit` step indices out of `n_steps`, evenly spaced, always with the first and the last."""
    if n_steps <= limit:
        return list(range(n_steps))
    return sorted({round(i * (n_steps - 1) / (limit - 1)) for i in range(limit)})


def run_row(trace: Trace) -> dict[str, Any]:
    """The `runs` row of a trace: identity, spec, prompt, status and the metrics of `summarize`."""
    chat = not isinstance(trace.prompt, str)
    row: dict[str, Any] = {
        "run_id": trace.run_id, "created_at": _utc(trace.created_at), "finished_at": None,
        "spec_json": trace.spec.to_json(), "spec": trace.spec.to_string(), "model": trace.model,
        "dtype": trace.dtype, "device": trace.device, "hardware": trace.hardware, "status": trace.status,
        "error": trace.error, "prompt": json.dumps(trace.prompt) if chat else trace.prompt, "prompt_is_chat": chat,
        "n_prompt_tokens": len(trace.prompt_ids), "weight_bytes": trace.weight_bytes, "text": trace.text,
    }
    if trace.status != "running":
        summary = trace.summary()
        row["finished_at"] = datetime.now(timezone.utc).replace(tzinfo=None)
        for key in ("n_new_tokens", "tok_per_s", "decode_tok_per_s", "ttft_s", "total_s", "target_forwards",
                    "mean_accepted_length", "acceptance_rate", "acceptance_per_position", "nodes_drafted",
                    "tokens_accepted", "draft_s", "verify_s", "prefill_s", "accept_s", "cache_bytes",
                    "peak_cache_bytes", "finish_reason", "lossless", "alpha", "predicted_tokens_per_step",
                    "tokens_per_step"):
            row[key] = summary[key]
        for key in ("simulated", "warm_start", "cache_live_bytes", "peak_cache_live_bytes", "warnings",
                    "cache_off_bytes", "peak_cache_off_bytes", "cache_moved_bytes", "cache_moved_s", "departures",
                    "departure_rate", "target_perplexity", "drafter_forwards", "tokens_per_target_forward"):
            row[key] = summary.get(key)  # NULL until the trace's summary carries them
        provenance = summary.get("provenance")
        row["provenance"] = None if provenance is None else json.dumps(provenance, default=str)
    return row


def failure_cause(err: Exception) -> str:
    """A write error in one line: "no space left on device writing /x/runs.duckdb.wal" for an OS error on a
    named file, else DuckDB's first line."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    file = re.search(r'"([^"]+)"', text)
    if isinstance(err, duckdb.IOException) and file and ": " in text:
        cause = text.rsplit(": ", 1)[1].rstrip(".")
        return f"{cause[:1].lower()}{cause[1:]} writing {file.group(1)}"
    return text


def detail_tables(trace: Trace) -> dict[str, pa.Table]:
    """steps, tokens, draft_nodes and cache_stats of a trace as Arrow tables, columns in table order."""
    rid = trace.run_id
    steps: dict[str, list] = {k: [] for k in ("run_id", "step", "draft_ns", "verify_ns", "accept_ns", "elapsed_ns",
                                              "nodes_drafted", "tokens_accepted", "bonus_token", "n_tokens",
                                              "cache_bytes", "cache_tokens", "text", "finish_reason",
                                              "cache_live_bytes", "cache_off_bytes", "drafter_forwards")}
    tokens: dict[str, list] = {k: [] for k in ("run_id", "position", "token_id", "text", "source", "logprob",
                                               "entropy", "step", "target_argmax")}
    nodes: dict[str, list] = {k: [] for k in ("run_id", "step", "node", "parent", "token_id", "depth", "draft_prob",
                                              "target_prob", "accepted")}
    cache: dict[str, list] = {k: [] for k in ("run_id", "step", "layer", "head", "tokens_held", "bytes", "bits",
                                              "sparsity", "kept", "simulated")}
    for position, token in enumerate(trace.prompt_ids):
        for key, value in zip(tokens, (rid, position, token, None, "prompt", None, None, None, None)):
            tokens[key].append(value)
    generated = 0
    sampled = set(sampled_steps(len(trace.events)))
    kept_steps = _kept_steps(trace)
    sampled |= kept_steps
    for e in trace.events:
        values = (rid, e.step, e.draft_ns, e.verify_ns, e.accept_ns, e.elapsed_ns, e.n_drafted, e.n_accepted,
                  "bonus" in e.sources, len(e.tokens), e.cache_bytes, sum(e.cache_tokens), e.text, e.finish_reason,
                  getattr(e, "cache_live_bytes", None), getattr(e, "cache_off_bytes", None),
                  getattr(e, "drafter_forwards", None))
        for key, value in zip(steps, values):
            steps[key].append(value)
        alone = e.text if len(e.tokens) == 1 else None  # a token's own text is known only when it is alone
        for i, token in enumerate(e.tokens):
            argmax = getattr(e, "target_argmax", None) or []
            values = (rid, e.positions[i], token, alone, e.sources[i], e.logprobs[i], e.entropies[i], e.step,
                      argmax[i] if i < len(argmax) else None)
            for key, value in zip(tokens, values):
                tokens[key].append(value)
        if e.tree is not None:
            t = e.tree
            for i in range(len(t.tokens)):
                values = (rid, e.step, i, t.parents[i], t.tokens[i], t.depths[i], t.draft_probs[i], t.target_probs[i],
                          t.accepted[i])
                for key, value in zip(nodes, values):
                    nodes[key].append(value)
        generated += len(e.tokens)
        stats = getattr(e, "cache_stats", None)
        if e.step in sampled and stats is not None:  # per head, with the kept positions where chosen
            kept = stats.kept if e.step in kept_steps else None
            for layer, heads in enumerate(stats.tokens):
                for head in range(len(heads)):
                    values = (rid, e.step, layer, head, stats.tokens[layer][head], stats.bytes[layer][head],
                              stats.bits[layer][head], stats.sparsity[layer][head],
                              kept[layer][head] if kept is not None else None, stats.simulated)
                    for key, value in zip(cache, values):
                        cache[key].append(value)
        elif e.step in sampled:
            logical = len(trace.prompt_ids) + generated - 1  # the last committed token is pending, not cached
            for layer, held in enumerate(e.cache_tokens):
                values = (rid, e.step, layer, None, held, None, None, 1 - held / logical if logical > 0 else 0.0,
                          None, None)
                for key, value in zip(cache, values):
                    cache[key].append(value)
    return {name: pa.table(columns) for name, columns in
            (("steps", steps), ("tokens", tokens), ("draft_nodes", nodes), ("cache_stats", cache))}


def _kept_steps(trace: Trace) -> set[int]:
    """Steps whose kept positions are stored: evenly chosen among those the engine sampled (the last always),
    at most KEPT_STORE_STEPS, while their positions add up to at most KEPT_STORE_INTS."""
    events = [e for e in trace.events if getattr(e, "cache_stats", None) is not None and e.cache_stats.kept]
    chosen = [events[i] for i in sampled_steps(len(events), KEPT_STORE_STEPS)]
    out, total = set(), 0
    for e in reversed(chosen):  # the latest first: the app draws the last known state
        size = sum(len(h) for layer in e.cache_stats.kept for h in layer)
        if total + size > KEPT_STORE_INTS:
            break
        out.add(e.step)
        total += size
    return out


def _check_before_writing(path: Path) -> None:
    """Run the file's checks on a read-only connection first, so a writer never rewrites (replays a WAL into,
    checkpoints) a file it then refuses: a foreign database, a newer store."""
    con = connect(path, read_only=True)
    try:
        stored_version(con, path)
    finally:
        con.close()


class Store:
    """The writer of one store file (default: `default_store_path()`). Use from one thread, or via StoreThread."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path).expanduser().resolve() if path is not None else default_store_path().resolve()
        with _open_lock:
            if self.path in _open_writers:
                raise StoreError(f"{self.path} is already open for writing in this process; share that Store "
                                 "(or a StoreThread) instead of opening a second writer")
            if is_empty(self.path):
                self.path.unlink(missing_ok=True)  # an empty file is a store with no runs yet: DuckDB creates it
            else:
                _check_before_writing(self.path)
            self.con = connect(self.path, read_only=False)
            _open_writers.add(self.path)
        try:
            self._migrate()
            self.interrupted = self._mark_interrupted()
            self._queries = self.con.cursor()  # the parent of the console's own connections
            self._queries_lock = threading.Lock()
        except BaseException:
            self.close()
            raise

    def _migrate(self) -> None:
        version = stored_version(self.con, self.path)
        self.con.execute("BEGIN")
        try:
            if version == 0:
                self.con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMP)")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    self.con.execute(statement)
                self.con.execute("INSERT INTO schema_version VALUES (?, ?)",
                                 [target, datetime.now(timezone.utc).replace(tzinfo=None)])
            for statement in VIEWS:
                self.con.execute(statement)
            self.con.execute("COMMIT")
        except duckdb.Error as err:
            self._rollback()
            raise StoreError(f"could not bring {self.path} to store schema version {SCHEMA_VERSION}: "
                             f"{failure_cause(err)}") from None

    def _rollback(self) -> None:
        try:
            self.con.execute("ROLLBACK")
        except duckdb.Error:
            pass  # the failed statement already ended the transaction

    def _mark_interrupted(self) -> list[str]:
        """Runs left `running` by a writer that is gone (we hold the lock, so it is) become `interrupted`."""
        ids = [r[0] for r in self.con.execute("SELECT run_id FROM runs WHERE status = 'running'").fetchall()]
        if ids:
            self.con.execute("UPDATE runs SET status = 'interrupted', error = coalesce(error, "
                             "'the recording process ended before the run finished') WHERE status = 'running'")
        return ids

    def begin(self, trace: Trace) -> None:
        """Record the run as `running`, so a crash leaves a trace of it."""
        try:
            self._insert_run({**run_row(trace), "status": "running"})
        except duckdb.Error as err:
            raise StoreError(f"could not record run {trace.run_id} in {self.path}: {failure_cause(err)}") from None

    def _insert_run(self, row: dict[str, Any]) -> None:
        columns = ", ".join(row)
        self.con.execute(f"INSERT INTO runs ({columns}) VALUES ({', '.join('?' * len(row))})", list(row.values()))

    def finish(self, trace: Trace) -> None:
        """Write the run's details and final status in one transaction (inserting the run if not begun)."""
        if trace.status == "running":
            raise StoreError(f"run {trace.run_id} is still running; finish it with status done, failed or "
                             "interrupted")
        row = run_row(trace)
        tables = detail_tables(trace)
        try:
            self.con.execute("BEGIN")
            self._write_run(row, tables)
            self.con.execute("COMMIT")
        except duckdb.Error as err:
            self._rollback()
            cause = failure_cause(err)
            kept = self._keep_as_failed(row, cause)
            raise StoreError(f"could not record run {trace.run_id} in {self.path}: {cause}; {kept}") from None

    def _write_run(self, row: dict[str, Any], tables: dict[str, pa.Table]) -> None:
        status = self.con.execute("SELECT status FROM runs WHERE run_id = ?", [row["run_id"]]).fetchall()
        if status:
            if status[0][0] != "running":  # finished before: its details are replaced (a begun run has none)
                for name in tables:
                    self.con.execute(f"DELETE FROM {name} WHERE run_id = ?", [row["run_id"]])
            self._update_run(row)
        else:
            self._insert_run(row)
        self._append(tables)

    def _update_run(self, row: dict[str, Any]) -> None:
        sets = ", ".join(f"{k} = ?" for k in row if k != "run_id")
        self.con.execute(f"UPDATE runs SET {sets} WHERE run_id = ?",
                         [v for k, v in row.items() if k != "run_id"] + [row["run_id"]])

    def _keep_as_failed(self, row: dict[str, Any], cause: str) -> str:
        """After a failed write, keep the run's row (metrics and text, no details) as `failed` with the cause."""
        failed = {**row, "status": "failed", "error": f"the store could not record this run: {cause}"}
        try:
            exists = self.con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [row["run_id"]]).fetchall()[0][0]
            (self._update_run if exists else self._insert_run)(failed)
        except duckdb.Error as err:
            return f"marking it failed did not work either ({failure_cause(err)})"
        return "it is kept as failed, with its metrics and text but without its steps"

    def _append(self, tables: dict[str, pa.Table]) -> None:
        for name, table in tables.items():
            if table.num_rows:
                self.con.register("_incoming", table)
                try:
                    self.con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM _incoming")
                finally:
                    self.con.unregister("_incoming")

    def append_tables(self, tables: dict[str, pa.Table]) -> None:
        """Insert whole tables (an import) in one transaction."""
        try:
            self.con.execute("BEGIN")
            self._append(tables)
            self.con.execute("COMMIT")
        except duckdb.Error as err:
            self._rollback()
            raise StoreError(f"could not import into {self.path}: {failure_cause(err)}; nothing was imported") \
                from None

    def query(self, sql: str, limits: Limits | None = None, cancel: Cancel | None = None) -> pa.Table:
        """A console query in the writer's process (the app's case), from any thread: vetted like `Reader.query`
        and run on a connection of its own in a READ ONLY transaction, under `limits`, so it never waits for
        or holds up a write."""
        from .console import Limits, check_query, run_limited

        with self._queries_lock:
            con = self._queries.cursor()
        try:
            check_query(con, sql)
            return run_limited(con, sql, None, limits or Limits(), cancel)
        finally:
            con.close()

    def close(self) -> None:
        if self.con is not None:
            if getattr(self, "_queries", None) is not None:
                self._queries.close()
            self.con.close()
            self.con = None  # type: ignore[assignment]
            with _open_lock:
                _open_writers.discard(self.path)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StoreThread:
    """One writer thread fed by a queue, so many threads can record runs through one Store.

    `begin` and `finish` wait for their own write and re-raise its error, so a caller knows its run is stored.
    """

    def __init__(self, path: str | Path | None = None):
        self._queue: queue.Queue[tuple[Callable[[Store], Any], Future] | None] = queue.Queue()
        opened: Future = Future()
        self._thread = threading.Thread(target=self._serve, args=(path, opened), name="workbench-store", daemon=True)
        self._thread.start()
        self.path: Path = opened.result()

    def _serve(self, path: str | Path | None, opened: Future) -> None:
        try:
            store = Store(path)
        except BaseException as err:
            opened.set_exception(err)
            return
        self._store = store
        opened.set_result(store.path)
        try:
            while (item := self._queue.get()) is not None:
                work, done = item
                try:
                    done.set_result(work(store))
                except BaseException as err:
                    done.set_exception(err)
        finally:
            store.close()

    def _submit(self, work: Callable[[Store], Any]) -> Any:
        if not self._thread.is_alive():
            raise StoreError(f"the writer thread of {self.path} has been closed")
        done: Future = Future()
        self._queue.put((work, done))
        return done.result()

    def query(self, sql: str, limits: Limits | None = None, cancel: Cancel | None = None) -> pa.Table:
        """`Store.query`, on the caller's thread (never queued behind writes)."""
        if not self._thread.is_alive():
            raise StoreError(f"the writer thread of {self.path} has been closed")
        return self._store.query(sql, limits, cancel)

    def begin(self, trace: Trace) -> None:
        self._submit(lambda store: store.begin(trace))

    def finish(self, trace: Trace) -> None:
        self._submit(lambda store: store.finish(trace))

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def __enter__(self) -> StoreThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
