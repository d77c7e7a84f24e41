"""Hidden-test coding prompts: small Python functions the model writes, checked by asserts it never sees.

Each task in `coding_tasks.json` (written for this project, like the prompt suite) has a prompt (a function's
signature and docstring), a few hidden asserts and a reference solution. The model is asked, through its chat
template, to complete the function in a Python code block; `extract_code` takes that block from the output
(the rest of the output when the block is not closed), and `run_hidden_tests` runs it with the asserts in a
separate Python process (isolated mode, a temporary working directory, a timeout): generated code never runs in
the evaluating process. A task passes when that process exits cleanly.

Add a task by appending an object to the JSON file (id, entry_point, prompt, tests, reference);
tests/test_hidden_tests.py checks that every reference passes its asserts.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

TASKS_FILE = Path(__file__).with_name("coding_tasks.json")
TIMEOUT_S = 5.0
INSTRUCTION = "Complete this Python function. Reply with the whole function in a Python code block."


@dataclass(frozen=True)
class CodingTask:
    id: str
    entry_point: str  # the function's name
    prompt: str  # its signature and docstring
    tests: tuple[str, ...]  # one assert per item
    reference: str  # a correct implementation

    @property
    def chat_prompt(self) -> str:
        return f"{INSTRUCTION}\n\n```python\n{self.prompt}```"


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # "passed", "syntax error", "timeout", or the failing exception's type and line


@cache
def coding_tasks() -> tuple[CodingTask, ...]:
    """The tasks of coding_tasks.json, in file order."""
    records = json.loads(TASKS_FILE.read_text())
    return tuple(CodingTask(r["id"], r["entry_point"], r["prompt"], tuple(r["tests"]), r["reference"])
                 for r in records)


_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(output: str) -> str:
    """The first fenced code block of a model's answer (to the end of the text if it is not closed); the whole
    answer when it has no fence."""
    match = _FENCE.search(output)
    return match.group(1) if match else output


def parses(code: str) -> bool:
    """Whether `code` is non-empty, syntactically valid Python (ast.parse; nothing is run)."""
    if not code.strip():
        return False
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return False
    return True


def run_hidden_tests(code: str, task: CodingTask, timeout: float = TIMEOUT_S) -> Outcome:
    """Run `code` followed by the task's asserts in a fresh, isolated Python process."""
    if not parses(code):
        return Outcome(False, "syntax error")
    program = code + "\n\n" + "\n".join(task.tests) + "\n"
    with tempfile.TemporaryDirectory(prefix="workbench-hidden-") as folder:
        try:
            done = subprocess.run([sys.executable, "-I", "-c", program], cwd=folder, capture_output=True,
                                  text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return Outcome(False, "timeout")
    if done.returncode == 0:
        return Outcome(True, "passed")
    last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return Outcome(False, last[:200])
