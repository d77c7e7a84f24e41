"""The store's CLI commands (`runs`, `sql`, `export`, `import`) and the recording options of `generate`.

Kept apart from `workbench/cli.py` so the CLI stays a list of commands; duckdb is imported only when a
store command runs, so `workbench list` starts as fast as before.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

    from .writer import Store

STORE_HELP = "the store file (default: $WORKBENCH_STORE, else $XDG_DATA_HOME/workbench/runs.duckdb, " \
             "i.e. ~/.local/share/workbench/runs.duckdb)"


def add_recording_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--no-store", action="store_true", help="do not record this run")


def open_recorder(args: argparse.Namespace) -> Store | None:
    """The writer `generate` records into, or None with --no-store."""
    if args.no_store:
        return None
    from .writer import Store

    return Store(args.store)


def format_table(table: pa.Table, width: int = 40) -> str:
    """A plain text table: one header line, one line per row, cells cut to `width` characters."""
    names = table.column_names
    rows = [[_cell(v, width) for v in row.values()] for row in table.to_pylist()]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


# Control characters (C0, DEL, C1) and bidirectional overrides: printed raw, stored text could drive the terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every control character escaped as `\\xNN` / `\\uNNNN` (a newline as `\\n`)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _cell(value: Any, width: int) -> str:
    if value is None:
        return ""
    text = printable(f"{value:.4g}" if isinstance(value, float) else str(value))
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_result(table: pa.Table, as_json: bool, as_csv: bool) -> None:
    if as_json:
        print(json.dumps(table.to_pylist(), default=str))
    elif as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(table.column_names)
        for row in table.to_pylist():
            writer.writerow(["" if v is None else printable(str(v)) for v in row.values()])
    else:
        print(format_table(table))


def cmd_runs(args: argparse.Namespace) -> int:
    from .console import Reader

    with Reader(args.store) as reader:
        if args.run_id:
            run = reader.run(args.run_id)
            if args.json:
                print(json.dumps(run, default=str))
            else:
                for key, value in run.items():
                    if key not in ("text", "spec_json"):
                        print(f"{key:>22}  {'' if value is None else printable(str(value))}")
                text = "\n".join(printable(line) for line in (run["text"] or "").split("\n"))
                print(f"\n{text}")  # the output's own line breaks are kept
            return 0
        _print_result(reader.runs(args.limit), args.json, False)
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from workbench.errors import StoreError

    from .console import Limits, Reader, row_limit_note

    limits = Limits(args.timeout, args.max_rows, args.memory_mib)
    try:
        with Reader(args.store, limits) as reader:
            table = _query_interruptibly(reader, args.query)
            _print_result(table, args.json, args.csv)
    except KeyboardInterrupt:
        raise StoreError("query cancelled (Ctrl-C)") from None
    if (note := row_limit_note(table)) is not None:
        print(note, file=sys.stderr)
    return 0


def _query_interruptibly(reader: Any, sql: str) -> pa.Table:
    """Run the query on a worker thread, so Ctrl-C (delivered to this thread) cancels it at once."""
    from workbench.errors import StoreError

    from .console import Cancel

    cancel, out, done = Cancel(), {}, threading.Event()

    def work() -> None:
        try:
            out["table"] = reader.query(sql, cancel=cancel)
        except BaseException as err:  # handed to the main thread
            out["error"] = err
        finally:
            done.set()

    threading.Thread(target=work, name="workbench-sql", daemon=True).start()
    try:
        while not done.wait(0.1):
            pass
    except KeyboardInterrupt:
        cancel.cancel()
        done.wait(10)  # the interrupted query returns at once; the reader closes after it
        raise StoreError("query cancelled (Ctrl-C)") from None
    if "error" in out:
        raise out["error"]
    return out["table"]


def cmd_export(args: argparse.Namespace) -> int:
    from .console import Reader
    from .transfer import export_parquet

    with Reader(args.store) as reader:
        counts = export_parquet(reader, args.parquet)
    print(f"exported {counts['runs']} runs to {Path(args.parquet)} "
          f"({', '.join(f'{k} {v}' for k, v in counts.items())} rows)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .transfer import import_parquet
    from .writer import Store

    with Store(args.store) as store:
        counts = import_parquet(store, args.folder)
        print(f"imported {counts['runs']} new runs into {store.path}")
    return 0


def add_commands(sub: Any) -> None:
    """Register runs, sql, export and import on the CLI's subparsers."""
    p = sub.add_parser("runs", help="list recorded runs, newest first, or show one")
    p.add_argument("run_id", nargs="?", help="show this run (a unique prefix of its id is enough)")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("sql", help="run one read-only query on the store (tables: runs, steps, tokens, "
                                   "draft_nodes, cache_stats; views: run_summary, technique_comparison)")
    p.add_argument("query")
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="stop the query after this long (default 10; 0: no limit)")
    p.add_argument("--max-rows", type=int, default=10_000, help="return at most this many rows (default 10000)")
    p.add_argument("--memory-mib", type=int, default=1024,
                   help="DuckDB's working memory, and the most result held, in MiB (default 1024)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON array of row objects")
    fmt.add_argument("--csv", action="store_true")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("export", help="write the store's tables as Parquet files")
    p.add_argument("--parquet", required=True, metavar="DIR", help="folder for <table>.parquet files")
    p.add_argument("--store", help=STORE_HELP)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="add the runs of a Parquet export to the store (known run ids skipped)")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("--store", help=STORE_HELP)
    p.set_defaults(func=cmd_import)
