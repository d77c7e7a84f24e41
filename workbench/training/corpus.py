"""Training prompts built from text that ships with Python: the standard library's docstrings and source.

Self-distillation (Medusa-2, FastDraft) only needs prompts that look like what users ask; the answers come
from the target itself. The prompts here never come from the benchmark suite (workbench/eval/suite.py), so a
drafter is never measured on what it was trained on; `overlaps_suite` checks that, and the tests call it.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re

# Modules whose docstrings and functions make the prompts: prose (documentation to summarize or explain)
# and code (functions to explain or edit), like the suite's categories but none of its text.
MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections", "colorsys", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "difflib", "enum", "filecmp", "fnmatch", "fractions", "functools", "glob",
    "gzip", "heapq", "html", "inspect", "ipaddress", "itertools", "json", "keyword", "linecache", "locale",
    "logging", "mimetypes", "numbers", "operator", "pathlib", "pickle", "pprint", "queue", "quopri", "random",
    "reprlib", "sched", "secrets", "shlex", "shutil", "statistics", "string", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "urllib.parse", "uuid", "warnings",
    "weakref", "zipfile",
)

_TEMPLATES_DOC = (
    "Summarize the following documentation in two or three sentences.\n\n{text}",
    "Explain to a beginner what this part of Python's standard library is for.\n\n{text}",
    "What are the main points of this text? Answer with a short list.\n\n{text}",
)
_TEMPLATES_CODE = (
    "Explain what this Python function does, step by step.\n\n```python\n{text}\n```",
    "Add type hints and a docstring to this function.\n\n```python\n{text}\n```",
    "Suggest one way to simplify this Python code, and show the new version.\n\n```python\n{text}\n```",
)
_QUESTION = "What does `{name}` in Python's {module} module do, and when would you use it?"


def _pieces(module_name: str) -> list[tuple[str, str]]:
    """(kind, text) pieces of one module: its docstring, short functions' sources, and questions."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # a stdlib module missing from this build of Python: skip it
        return []
    out: list[tuple[str, str]] = []
    doc = inspect.getdoc(module)
    if doc and len(doc) > 200:
        out.append(("doc", doc[:1500]))
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            try:
                source = inspect.getsource(obj)
            except (OSError, TypeError):
                continue
            if 150 < len(source) < 1400:
                out.append(("code", source))
            if inspect.getdoc(obj):
                out.append(("question", _QUESTION.format(name=f"{module_name}.{name}", module=module_name)))
        elif inspect.isclass(obj) and inspect.getdoc(obj) and len(inspect.getdoc(obj)) > 200:
            out.append(("doc", inspect.getdoc(obj)[:1500]))
    return out


def training_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` prompts drawn (deterministically from `seed`) from the standard library's text."""
    pieces = [p for name in MODULES for p in _pieces(name)]
    rng = random.Random(seed)
    rng.shuffle(pieces)
    prompts = []
    for kind, text in pieces[:count]:
        if kind == "doc":
            prompts.append(rng.choice(_TEMPLATES_DOC).format(text=text))
        elif kind == "code":
            prompts.append(rng.choice(_TEMPLATES_CODE).format(text=text.rstrip()))
        else:
            prompts.append(text)
    return prompts


def _word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def overlaps_suite(prompts: list[str], n: int = 10) -> list[str]:
    """Training prompts sharing a run of `n` words with any benchmark suite prompt (should be none)."""
    from workbench.eval.suite import suite

    suite_grams: set[tuple[str, ...]] = set()
    for item in suite():
        messages = item.prompt if isinstance(item.prompt, list) else [{"content": item.prompt}]
        for message in messages:
            suite_grams |= _word_ngrams(message["content"], n)
    return [p for p in prompts if _word_ngrams(p, n) & suite_grams]
