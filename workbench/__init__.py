"""An LLM inference workbench: combine decoding, KV-cache and weight-compression techniques on a real
model, watch what they do, and keep every run as a trace."""

from typing import Any

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
