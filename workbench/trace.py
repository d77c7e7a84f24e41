"""A Trace: one run's spec, prompt and StepEvents, as the store keeps it and the views replay it."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from workbench.engine import StepEvent
from workbench.spec import RunSpec


@dataclass
class Trace:
    spec: RunSpec
    prompt: str | list[dict[str, str]]
    prompt_ids: list[int]
    model: str
    dtype: str
    device: str
    hardware: str = ""
    weight_bytes: int = 0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    created_at: float = field(default_factory=time.time)
    events: list[StepEvent] = field(default_factory=list)
    status: str = "running"  # then done, failed or interrupted
    error: str | None = None
    simulated: list[str] = field(default_factory=list)  # techniques whose speed is simulated (no kernel runs them)
    warm_start: bool = False  # a drafter started from state kept from earlier runs (opt-in: hot_start)
    warnings: list[str] = field(default_factory=list)  # what a user should know about the run (Engine.warnings)
    provenance: dict[str, Any] = field(default_factory=dict)  # commit, machine, versions, backends (provenance.py)

    @property
    def token_ids(self) -> list[int]:
        """Generated token ids (the prompt excluded), in order."""
        return [t for e in self.events for t in e.tokens]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def finish_reason(self) -> str | None:
        return self.events[-1].finish_reason if self.events else None

    def summary(self) -> dict[str, Any]:
        from workbench.metrics import summarize

        return summarize(self)
