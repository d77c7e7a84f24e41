"""An LLM inference workbench: combine decoding, KV-cache and weight-compression techniques on a real
model, watch what they do, and keep every run as a trace."""

import os
from typing import Any

# OpenMP threads that spin while they wait for each other stall every operation when another process holds a
# core (libgomp's default spin: 2.3 tok/s on the shared 2-core machine), and threads that sleep at once halve
# the speed of a quiet one (50 against 110 tok/s). A short spin keeps both: 107 quiet, 15 shared (docs/
# performance.md, "Threads on a shared machine"). Set before torch loads its OpenMP runtime; a user's
# OMP_WAIT_POLICY or GOMP_SPINCOUNT wins, and each run's provenance records them.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "3000"

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
