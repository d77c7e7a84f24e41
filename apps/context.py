"""What one app server holds: the Workbench (its model loaded once), the store writer and per-session stops."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from workbench.api import Workbench
from workbench.errors import SpecError, StoreError
from workbench.spec import RunSpec
from workbench.views.tokens import token_labeler

MAX_PROMPT_CHARS = 20_000  # longer prompts are refused before tokenizing (the context window is checked after)
MAX_COLUMNS = 4
MAX_NEW_TOKENS = 1024  # the app's max new tokens control goes up to this; larger requests are clamped, saying so


@dataclass
class AppContext:
    wb: Workbench
    store: object | None = None  # a StoreThread: the app's runs are recorded through it, queries go through it
    queue_size: int = 16  # generation requests that may wait in the queue
    _stops: set[tuple[str, int]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, model: str, dtype: str = "auto", device: str = "auto", store: str | Path | None = None,
               record: bool = True) -> AppContext:
        """Load the model once for the whole server, and open the store writer unless `record` is False."""
        recorder = None
        if record:
            from workbench.store import StoreThread

            recorder = StoreThread(store)
        try:
            wb = Workbench(model, dtype, device, store=recorder, freeze_gc=True)
        except BaseException:
            if recorder is not None:
                recorder.close()
            raise
        return cls(wb, recorder)

    @property
    def model_name(self) -> str:
        return self.wb.default.model

    @functools.cached_property
    def label(self):
        """Token id -> its text, for the views."""
        return token_labeler(self.wb.model(self.wb.default))

    def query(self, sql: str) -> pa.Table:
        """A sealed console query through the writer (the store's rules apply: reads only)."""
        if self.store is None:
            raise StoreError("this app records no runs (started with --no-store), so there is nothing to query")
        return self.store.query(sql)

    def check_spec(self, text: str) -> str:
        """Refuse specs that would load another model: the server runs every configuration on its own."""
        spec = RunSpec.parse(text or "")
        for key in ("model", "dtype", "device"):
            if getattr(spec, key) != getattr(RunSpec, key) and getattr(spec, key) != getattr(self.wb.default, key):
                raise SpecError(f"this app runs every configuration on {self.wb.default.model} "
                                f"({self.wb.default.dtype}, {self.wb.default.device}); the spec asks for "
                                f"{key}={getattr(spec, key)}: remove it, or start `workbench app --model ...`")
        return text or ""

    # Stop buttons: a flag per (browser session, column), read by the running generation between steps.
    def stop(self, session: str, column: int) -> None:
        with self._lock:
            self._stops.add((session, column))

    def clear_stops(self, session: str) -> None:
        with self._lock:
            self._stops = {s for s in self._stops if s[0] != session}

    def stopped(self, session: str, column: int) -> bool:
        with self._lock:
            return (session, column) in self._stops

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
