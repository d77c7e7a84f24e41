"""The DuckDB trace store: one writer per file, sealed read-only readers, Parquet export and import.

    from workbench.store import Store, Reader
    wb = Workbench("random:llama", store=Store("runs.duckdb"))   # every run is recorded
    Reader("runs.duckdb").query("SELECT decode, avg(tok_per_s) FROM run_summary GROUP BY ALL")

See docs/store.md for the schema, the views, the default location and the console's rules.
"""

from typing import Any

_EXPORTS = {
    "Reader": "console", "check_query": "console", "default_store_path": "database",
    "SCHEMA_VERSION": "schema", "TABLES": "schema", "VIEW_NAMES": "schema",
    "export_parquet": "transfer", "import_parquet": "transfer",
    "CACHE_SAMPLE_STEPS": "writer", "Recorder": "writer", "Store": "writer", "StoreThread": "writer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Imported on first use, so the CLI starts without loading duckdb and pyarrow for commands that skip them.
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f"workbench.store.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'workbench.store' has no attribute {name!r}")
