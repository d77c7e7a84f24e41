"""Write the teaching labs (notebooks/*.ipynb and notebooks/solutions/*.ipynb) from their sources.

Each lab is one Python file in notebooks/src/ split into cells by `# %%` lines (`# %% [markdown]` for prose,
written as `# ` comment lines). Inside a code cell, the lines between `# BEGIN SOLUTION` and `# END SOLUTION`
are the answer: the solutions copy keeps them, the student copy replaces them with a `raise
NotImplementedError` at the same indentation. Both are written without outputs.

    python scripts/make_notebooks.py          # (re)write every notebook
    python scripts/make_notebooks.py --check  # fail if a committed notebook differs from its source
    python scripts/make_notebooks.py --run    # run every solutions copy, write docs/results/notebook_times.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SRC, OUT = ROOT / "notebooks" / "src", ROOT / "notebooks"
STUB = 'raise NotImplementedError("exercise: write your answer here (notebooks/solutions/ has one)")'


def cells(source: str) -> list[tuple[str, str]]:
    """(kind, text) per `# %%` block; the file's header before the first marker is skipped."""
    out: list[tuple[str, list[str]]] = []
    for line in source.splitlines():
        if line.startswith("# %%"):
            out.append(("markdown" if "[markdown]" in line else "code", []))
        elif out:
            out[-1][1].append(line)
    result = []
    for kind, lines in out:
        if kind == "markdown":
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
        result.append((kind, "\n".join(lines).strip("\n")))
    return result


def student(code: str) -> str:
    """The code with each solution block replaced by a stub at its indentation."""
    out, inside = [], False
    for line in code.splitlines():
        stripped = line.strip()
        if stripped == "# BEGIN SOLUTION":
            inside = True
            out.append(line[: len(line) - len(line.lstrip())] + STUB)
        elif stripped == "# END SOLUTION":
            inside = False
        elif not inside:
            out.append(line)
    return "\n".join(out)


def solution(code: str) -> str:
    return "\n".join(ln for ln in code.splitlines() if ln.strip() not in ("# BEGIN SOLUTION", "# END SOLUTION"))


def notebook(parts: list[tuple[str, str]], solved: bool) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for i, (kind, text) in enumerate(parts):
        if kind == "markdown":
            cell = nbformat.v4.new_markdown_cell(text)
        else:
            cell = nbformat.v4.new_code_cell(solution(text) if solved else student(text))
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating an unchanged lab changes nothing
        nb.cells.append(cell)
    return nb


def rendered() -> dict[Path, str]:
    """Every notebook's path and JSON text."""
    files = {}
    for src in sorted(SRC.glob("[0-9][0-9]_*.py")):
        parts = cells(src.read_text())
        name = src.with_suffix(".ipynb").name
        for folder, solved in ((OUT, False), (OUT / "solutions", True)):
            files[folder / name] = nbformat.writes(notebook(parts, solved)) + "\n"
    return files


def execute(path: Path, limit_s: float) -> tuple[nbformat.NotebookNode, float]:
    """Run a notebook top to bottom in a fresh kernel (its folder as working directory), each cell under
    `limit_s`; return the executed notebook (not saved) and the wall time."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=limit_s, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
                   ).execute()
    return nb, time.perf_counter() - start


def run_all(limit_s: float = 240) -> dict:
    """Every solutions copy's run time, with the machine's load (the machine may be shared)."""
    times = {}
    for path in sorted((OUT / "solutions").glob("[0-9][0-9]_*.ipynb")):
        _, elapsed = execute(path, limit_s)
        times[path.name] = round(elapsed, 1)
        print(f"{path.name}: {elapsed:.1f} s", flush=True)
    return {"command": "python scripts/make_notebooks.py --run", "seconds": times,
            "total_s": round(sum(times.values()), 1), "load_average_after": os.getloadavg(),
            "cpus": os.cpu_count(), "machine": platform.machine()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed notebook differs from its source")
    parser.add_argument("--run", action="store_true", help="run every solutions copy and write its run time to "
                        "docs/results/notebook_times.json")
    args = parser.parse_args()
    if args.run:
        result = run_all()
        (ROOT / "docs" / "results" / "notebook_times.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return 0
    stale = []
    for path, text in rendered().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("these notebooks differ from notebooks/src/; run python scripts/make_notebooks.py:\n  "
              + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
