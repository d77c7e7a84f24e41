"""Long English text from Python's own standard library, for quality evaluation and calibration.

Nothing is downloaded: the evaluation text is the reference manual's topic pages shipped in
`pydoc_data.topics` (about 460k characters); the calibration text (for GPTQ, EoRA and double sparsity's
channel calibration) is the docstrings of a fixed list of standard-library modules, so a method is never
calibrated on the text it is scored on. Both change with the Python version, so every result records
`text_hash(...)` of the text it used.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect

# Modules whose docstrings (module, classes, functions) make the calibration text.
CALIBRATION_MODULES = ("argparse", "collections", "json", "logging", "subprocess", "typing", "unittest",
                       "pathlib", "datetime", "decimal", "fractions", "textwrap", "difflib", "heapq",
                       "functools", "itertools", "csv", "email.message", "http.client", "urllib.parse")


def evaluation_text() -> str:
    """The reference manual's topic pages, in sorted order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def calibration_text() -> str:
    """Docstrings of CALIBRATION_MODULES and their public members, in a fixed order."""
    parts = []
    for name in CALIBRATION_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            member = getattr(module, attr)
            if attr.startswith("_") or getattr(member, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(member)
            if doc:
                parts.append(doc)
    return "\n\n".join(p.strip() for p in parts if p.strip())


def text_hash(text: str) -> str:
    """Short SHA-256 of the text, recorded beside every result computed on it."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
