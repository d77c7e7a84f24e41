"""Opening a store file safely: where it lives, what may be opened, and errors that say what to do.

Every connection has external access disabled and its configuration locked: the store never needs to
read or write any file but its own (Parquet goes through pyarrow), so no query can either.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import duckdb

from workbench.errors import StoreError

from .schema import SCHEMA_VERSION

SEALED = {"enable_external_access": False, "lock_configuration": True, "temp_directory": ""}  # no spilling to disk
DEFAULT_MEMORY_MIB = 1024  # DuckDB's working memory per store file opened (the console's memory limit)
_DUCKDB_MAGIC = b"DUCK"  # bytes 8..12 of every DuckDB database file


def default_store_path() -> Path:
    """`$WORKBENCH_STORE`, else `$XDG_DATA_HOME/workbench/runs.duckdb` (`~/.local/share/...` by default)."""
    if os.environ.get("WORKBENCH_STORE"):
        return Path(os.environ["WORKBENCH_STORE"]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "workbench" / "runs.duckdb"


def _describe_foreign(head: bytes) -> str:
    if head.startswith(b"SQLite format 3\x00"):
        return "a SQLite database"
    if head.startswith(b"PAR1"):
        return "a Parquet file"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "an unknown binary file"


def is_empty(path: Path) -> bool:
    """No store yet: the path does not exist or is an empty regular file (both are initialised by a writer
    and reported as "no run recorded yet" by a reader, the same way)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return True
    return stat.S_ISREG(info.st_mode) and info.st_size == 0


def check_file(path: Path) -> None:
    """Refuse a file that is not a DuckDB database, before DuckDB can touch it (or block on it)."""
    if is_empty(path):
        return
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        raise StoreError(f"the store path {path} is a folder; give a file path such as {path / 'runs.duckdb'}")
    if not stat.S_ISREG(mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise StoreError(f"the store path {path} is {kind}, not a regular file; give the path of a store file "
                         "(or of one to create)")
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) < 12 or head[8:12] != _DUCKDB_MAGIC:
        raise StoreError(f"{path} is {_describe_foreign(head)}, not a workbench store (a DuckDB database); "
                         "it was left untouched: pass --store with another path or move the file away")


def connect(path: Path, read_only: bool, memory_mib: int = DEFAULT_MEMORY_MIB) -> duckdb.DuckDBPyConnection:
    """A sealed connection to the store file, or a StoreError saying why it cannot be opened."""
    if read_only and is_empty(path):
        raise StoreError(f"no store at {path}: no run has been recorded there yet "
                         "(`workbench generate` records runs; --store or WORKBENCH_STORE pick the file)")
    check_file(path)
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return duckdb.connect(str(path), read_only=read_only, config={**SEALED, "memory_limit": f"{memory_mib}MiB"})
    except duckdb.IOException as err:
        if "lock" in str(err).lower():
            pid = re.search(r"PID (\d+)", str(err))
            who = f"another process (PID {pid.group(1)})" if pid else "another process"
            raise StoreError(f"{path} is in use by {who}, which is writing to it; one process may write to "
                             "a store at a time: wait for it to finish, or pass --store with another file "
                             "(or --no-store)") from None
        raise StoreError(f"cannot open the store {path}: {str(err).splitlines()[0]}") from None
    except duckdb.ConnectionException as err:
        if "different configuration" not in str(err):
            raise StoreError(f"cannot open the store {path}: {str(err).splitlines()[0]}") from None
        raise StoreError(f"{path} is open for writing in this process; query it through that writer "
                         "(Store.query or StoreThread.query) instead of opening a reader") from None
    except duckdb.Error as err:
        raise StoreError(f"{path} is not a readable workbench store ({str(err).splitlines()[0]}); "
                         "it was left untouched: pass --store with another path or move the file away") from None


def stored_version(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    """The schema version recorded in the file; 0 for an empty database; StoreError for a foreign one."""
    names = {r[0] for r in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}
    if "schema_version" not in names:
        if names:
            raise StoreError(f"{path} is a DuckDB database but not a workbench store (it has tables "
                             f"{', '.join(sorted(names)[:5])} and no schema_version); it was left untouched")
        return 0
    row = con.execute("SELECT max(version) FROM schema_version").fetchall()[0]
    version = int(row[0] or 0)
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} has store schema version {version}, newer than this workbench's "
                         f"{SCHEMA_VERSION}; upgrade the workbench to read it")
    return version
