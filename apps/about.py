"""What a configuration's techniques are: each one's summary and paper, read from the registry (the class
docstring's first paragraph, and the arXiv id its class or module docstring cites)."""

from __future__ import annotations

import html
import re
import sys

from workbench import registry
from workbench.errors import WorkbenchError
from workbench.spec import RunSpec

ARXIV = re.compile(r"arXiv[: ]?(\d{4}\.\d{4,5})")
CATEGORIES = (("decode", "decoding"), ("accept", "acceptance"), ("cache", "cache"), ("compress", "compression"))


def paper(technique: registry.Technique) -> str | None:
    """The arXiv id the technique's docstrings cite first (its class's, then its module's), or None."""
    module = sys.modules.get(technique.cls.__module__)
    for doc in (technique.cls.__doc__, getattr(module, "__doc__", None)):
        found = ARXIV.search(doc or "")
        if found:
            return found.group(1)
    return None


def technique_line(category: str, name: str) -> str:
    """Markdown: **name**: summary, with a link to its paper when it cites one."""
    t = registry.get(category, name)
    line = f"**{html.escape(t.name)}**: {html.escape(' '.join(t.summary.split()))}"
    arxiv = paper(t)
    return line + (f" ([arXiv {arxiv}](https://arxiv.org/abs/{arxiv}))" if arxiv else "")


def spec_about(text: str) -> str:
    """Markdown, one line per technique the spec names (its decoding always); "" while the spec does not
    parse (running it says why)."""
    try:
        spec = RunSpec.parse(text or "")
        lines = []
        for field, category in CATEGORIES:
            value = getattr(spec, field)
            for t in value if isinstance(value, list) else [value] if value is not None else []:
                lines.append(technique_line(category, t.name))
    except WorkbenchError:
        return ""
    return "<br>".join(f"<sub>{line}</sub>" for line in lines)
