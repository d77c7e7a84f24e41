"""The store's CLI commands (`runs`, `sql`, `export`, `import`) and the recording options of `generate`.

Kept apart from `workbench/cli.py` so the CLI stays a list of commands; duckdb is imported only when a
store command runs, so `workbench list` starts as fast as before.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
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


def _cell(value: Any, width: int) -> str:
    if value is None:
        return ""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_result(table: pa.Table, as_json: bool, as_csv: bool) -> None:
    if as_json:
        print(json.dumps(table.to_pylist(), default=str))
    elif as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(table.column_names)
        for row in table.to_pylist():
            writer.writerow(["" if v is None else v for v in row.values()])
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
                        print(f"{key:>22}  {'' if value is None else value}")
                print(f"\n{run['text'] or ''}")
            return 0
        _print_result(reader.runs(args.limit), args.json, False)
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from .console import Reader

    with Reader(args.store) as reader:
        _print_result(reader.query(args.query), args.json, args.csv)
    return 0


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
