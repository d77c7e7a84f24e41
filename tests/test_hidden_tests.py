"""The hidden-test coding prompts: every reference solution passes its asserts, wrong code fails them, and the
generated code runs in a separate process with a timeout."""

import ast
import sys

import pytest

from workbench.eval.hidden_tests import coding_tasks, extract_code, parses, run_hidden_tests


def test_tasks_are_well_formed():
    tasks = coding_tasks()
    assert 6 <= len(tasks) <= 10 and len({t.id for t in tasks}) == len(tasks)
    for t in tasks:
        stub = ast.parse(t.prompt + "    ...\n").body[0]  # signature + docstring, nothing else
        assert isinstance(stub, ast.FunctionDef) and stub.name == t.entry_point and ast.get_docstring(stub)
        assert t.tests and all(test.startswith("assert ") for test in t.tests)
        assert t.prompt in t.chat_prompt


@pytest.mark.parametrize("task", coding_tasks(), ids=lambda t: t.id)
def test_reference_passes_and_a_wrong_body_fails(task):
    assert run_hidden_tests(task.reference, task).passed
    wrong = run_hidden_tests(task.prompt + "    return None\n", task)
    assert not wrong.passed and "AssertionError" in wrong.reason


def test_syntax_errors_timeouts_and_missing_functions_fail():
    task = coding_tasks()[0]
    assert run_hidden_tests("def broken(:\n", task).reason == "syntax error"
    assert run_hidden_tests("while True:\n    pass\n", task, timeout=0.5).reason == "timeout"
    missing = run_hidden_tests("x = 1\n", task)
    assert not missing.passed and "NameError" in missing.reason


def test_generated_code_does_not_run_in_this_process(tmp_path):
    task = coding_tasks()[0]
    marker = tmp_path / "touched"
    code = f"import pathlib, sys\nsys.hidden_marker = 1\npathlib.Path({str(marker)!r}).write_text('x')\n"
    code += task.reference
    assert run_hidden_tests(code, task).passed and marker.exists()  # it ran, in a child process
    assert not hasattr(sys, "hidden_marker")


def test_extract_code_takes_the_first_block_or_the_rest():
    answer = "Here it is:\n```python\ndef f():\n    return 1\n```\nIt returns one.\n```python\nx = 2\n```"
    assert extract_code(answer) == "def f():\n    return 1\n"
    assert extract_code("```python\ndef f():\n    ret") == "def f():\n    ret"  # cut short by the token limit
    assert extract_code("def f(): return 1") == "def f(): return 1"
    assert parses("def f():\n    return 1\n") and not parses("def f():\n    ret(") and not parses("  \n")
