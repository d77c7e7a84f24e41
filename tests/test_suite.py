"""The speculative-decoding prompt suite: its shape per category, selection and hash."""

from __future__ import annotations

import ast
import dataclasses
import re

import pytest

from workbench.eval import suite as suite_module
from workbench.eval.suite import CATEGORIES, SUITE, SuitePrompt, suite, suite_hash


def of(category: str) -> list[SuitePrompt]:
    return [p for p in SUITE if p.category == category]


def text(p: SuitePrompt) -> str:
    assert isinstance(p.prompt, str), p.id
    return p.prompt


def test_categories_are_the_seven_of_the_issue():
    assert CATEGORIES == ("multi_turn", "translation", "summarization", "qa", "math", "rag", "code_edit")
    assert {p.category for p in SUITE} == set(CATEGORIES)


@pytest.mark.parametrize("category", CATEGORIES)
def test_ten_prompts_per_category(category):
    assert len(of(category)) == 10


def test_ids_are_unique_and_named_after_their_category():
    ids = [p.id for p in SUITE]
    assert len(ids) == len(set(ids)) == 70
    for p in SUITE:
        assert re.fullmatch(rf"{p.category}-\d\d", p.id), p.id


def test_prompts_are_non_empty_and_text_except_multi_turn():
    for p in SUITE:
        if p.category == "multi_turn":
            assert isinstance(p.prompt, list), p.id
        else:
            assert text(p).strip() == text(p) and text(p), p.id


@pytest.mark.parametrize("p", of("multi_turn"), ids=lambda p: p.id)
def test_multi_turn_is_an_alternating_chat_ending_with_a_user_turn(p):
    messages = p.prompt
    assert isinstance(messages, list) and len(messages) >= 3
    for m in messages:
        assert isinstance(m, dict) and set(m) == {"role", "content"}
        assert isinstance(m["content"], str) and m["content"].strip()
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    assert [m["role"] for m in turns] == ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    assert turns[-1]["role"] == "user"
    assert any(m["role"] == "assistant" for m in turns)


@pytest.mark.parametrize("p", of("translation"), ids=lambda p: p.id)
def test_translation_names_its_language(p):
    assert re.match(r"Translate to (French|German|Spanish): \S", text(p)), p.id


def test_translation_covers_three_languages():
    assert {re.match(r"Translate to (\w+):", text(p)).group(1) for p in of("translation")} == {
        "French",
        "German",
        "Spanish",
    }


@pytest.mark.parametrize("p", of("summarization"), ids=lambda p: p.id)
def test_summarization_passage_is_long_enough_and_asks_for_a_summary(p):
    passage, instruction = text(p).rsplit("\n\n", 1)
    assert 100 <= len(passage.split()) <= 250, p.id
    assert "summar" in instruction.lower()


@pytest.mark.parametrize("p", of("code_edit"), ids=lambda p: p.id)
def test_code_edit_holds_one_parsable_function_of_8_to_25_lines(p):
    assert "def " in text(p)
    code = text(p).split("```python\n", 1)[1].split("```", 1)[0]
    tree = ast.parse(code)
    assert [type(node) for node in tree.body] == [ast.FunctionDef]
    assert 8 <= len(code.splitlines()) <= 25
    assert "whole" in text(p)


@pytest.mark.parametrize("p", of("rag"), ids=lambda p: p.id)
def test_rag_has_context_of_two_to_four_passages_and_a_question(p):
    assert "Context:" in text(p) and "Question:" in text(p)
    context = text(p).split("Context:", 1)[1].split("Question:", 1)[0]
    passages = re.findall(r"^\[\d\] (.+)$", context, flags=re.MULTILINE)
    assert 2 <= len(passages) <= 4
    assert 80 <= sum(len(passage.split()) for passage in passages) <= 200


def test_suite_returns_all_prompts_by_default_in_order():
    assert suite() == list(SUITE)


def test_suite_picks_the_first_per_category_of_each():
    math = suite(["math"], 3)
    assert [p.id for p in math] == ["math-01", "math-02", "math-03"]
    assert all(p.category == "math" for p in math)
    mixed = suite(["rag", "qa"], per_category=2)
    assert [p.id for p in mixed] == ["rag-01", "rag-02", "qa-01", "qa-02"]
    assert len(suite(per_category=1)) == len(CATEGORIES)
    assert suite(["qa"], 0) == []
    assert suite("math", 100) == of("math")


def test_unknown_category_raises_naming_the_valid_ones():
    with pytest.raises(ValueError) as info:
        suite(["math", "poetry"])
    message = str(info.value)
    assert "poetry" in message
    for category in CATEGORIES:
        assert category in message


def test_negative_per_category_raises():
    with pytest.raises(ValueError):
        suite(per_category=-1)


def test_suite_hash_is_stable_and_changes_with_a_prompt(monkeypatch):
    first = suite_hash()
    assert first == suite_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", first)

    changed = dataclasses.replace(SUITE[0], prompt=SUITE[0].prompt[:-1] + [{"role": "user", "content": "Why?"}])
    monkeypatch.setattr(suite_module, "SUITE", (changed, *SUITE[1:]))
    assert suite_hash() != first

    edited = dataclasses.replace(SUITE[-1], prompt=text(SUITE[-1]) + " ")
    monkeypatch.setattr(suite_module, "SUITE", (*SUITE[:-1], edited))
    assert suite_hash() != first

    monkeypatch.setattr(suite_module, "SUITE", SUITE)
    assert suite_hash() == first


def test_prompts_are_hashable():
    assert len(set(SUITE)) == len(SUITE)
