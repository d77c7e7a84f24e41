"""An LLM inference workbench: combine decoding, KV-cache and weight-compression techniques on a real
model, watch what they do, and keep every run as a trace."""

import os
from typing import Any

# OpenMP threads that spin while they wait for each other stall every operation when another process holds a
# core: on the 2-core machine shared with other jobs, plain decoding fell from 12 to 0.6 tok/s (docs/
# performance.md, "Threads on a shared machine"). Sleeping waits avoid that. This must be set before torch
# loads its OpenMP runtime; a value set by the user wins, and each run's provenance records it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["RunSpec", "TechniqueSpec", "Workbench"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so `import workbench.spec` (CLI start-up, tests) stays light.
    if name == "Workbench":
        from workbench.api import Workbench

        return Workbench
    if name in ("RunSpec", "TechniqueSpec"):
        from workbench import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
