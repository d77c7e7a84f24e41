"""Training prompts built from text that ships with Python, in the benchmark suite's kinds of task.

Self-distillation (Medusa-2, FastDraft) only needs prompts that look like what users ask; the answers come
from the target itself, so no text here has to be correct. The text comes from Python's own files: the
standard library's docstrings and source, the language reference (`pydoc_data.topics`), IDLE's notes and
Python's license. Templates turn it into the suite's kinds of task: summaries, answers from given passages,
translations, questions, arithmetic word problems, code edits and multi-turn chats whose earlier answers are
the target's own (filled in when distilling). None of the suite's text is used: `overlaps_suite` checks that,
and the tests call it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from functools import cache

# Bumped whenever the prompts change: trained drafters' checkpoints are keyed by it (checkpoints.trained_path),
# so a drafter trained on other data is never loaded silently.
CORPUS_VERSION = 2

# One prompt of each kind in turn (the suite's categories), so every kind has the same share.
KINDS = ("summarization", "rag", "translation", "qa", "math", "code_edit", "multi_turn")

# Modules whose docstrings and functions make the prompts: prose (documentation to summarize or explain)
# and code (functions to explain or edit).
MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections", "colorsys", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "difflib", "enum", "filecmp", "fnmatch", "fractions", "functools", "glob",
    "gzip", "heapq", "html", "inspect", "ipaddress", "itertools", "json", "keyword", "linecache", "locale",
    "logging", "mimetypes", "numbers", "operator", "pathlib", "pickle", "pprint", "queue", "quopri", "random",
    "reprlib", "sched", "secrets", "shlex", "shutil", "statistics", "string", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "urllib.parse", "uuid", "warnings",
    "weakref", "zipfile",
)
_IDLE_NOTES = ("README.txt", "HISTORY.txt", "TODO.txt", "extend.txt")  # plain-English files in idlelib

_SUMMARIZE = (
    "{text}\n\nSummarize the text above in two or three sentences.",
    "{text}\n\nWrite a short summary of this passage for someone in a hurry.",
    "{text}\n\nList the key points of the passage above.",
    "Explain to a beginner what this part of Python's documentation says.\n\n{text}",
)
_RAG = "Use only the passages below to answer.\n\nPassages:\n{passages}\n\nQuestion: {question}\nAnswer:"
_RAG_QUESTIONS = ("What do the passages say about {title}?", "According to the passages, how does {title} work?",
                  "Which rules about {title} do the passages give?")
_LANGUAGES = ("French", "German", "Spanish", "Italian", "Portuguese")
_TRANSLATE = ("Translate to {lang}:\n{text}", "Please translate this into {lang}.\n\n{text}",
              "How would you say this in {lang}? {text}")
_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Femi", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lena")
_PLACES = ("market", "station", "library", "museum", "harbour", "post office", "garden centre", "pharmacy")
_THINGS = ("a refrigerator", "a bicycle's gears", "a compass", "a thermostat", "the water cycle", "a lighthouse",
           "an elevator", "a microwave oven", "a camera lens", "a wind turbine", "a battery", "a dishwasher",
           "a heat pump", "a sundial", "a parachute", "noise-cancelling headphones", "a solar panel", "a lock and key")
_PAIRS = (("weather", "climate"), ("a lake", "a pond"), ("speed", "acceleration"), ("a loan", "a grant"),
          ("baking soda", "baking powder"), ("an island", "a peninsula"), ("a comet", "an asteroid"),
          ("a list", "a tuple in Python"), ("a compiler", "an interpreter"), ("RAM", "disk storage"))
_QUESTIONS = ("Explain in a few sentences how {thing} works.", "What is {thing} used for, and why is it useful?",
              "What is the difference between {a} and {b}?", "How does {title} work in Python?",
              "What does `{name}` in Python's {module} module do, and when would you use it?")
_CODE = (
    "Explain what this Python function does, step by step.\n\n```python\n{text}\n```",
    "Add type hints and a docstring to this function. Return the whole function.\n\n```python\n{text}\n```",
    "Give the variables clearer names and return the complete function.\n\n```python\n{text}\n```",
    "Add comments that explain each step, then show the full function again.\n\n```python\n{text}\n```",
    "Make this function raise a ValueError on invalid arguments. Show the whole new version.\n\n```python\n"
    "{text}\n```",
)
_FOLLOW_UPS = ("Can you give a short example?", "Please make that shorter.", "Now explain it to a ten-year-old.",
               "Are you sure? Check it once more.", "What would change if the numbers were different?",
               "Thanks. Can you put that in a list?", "Why is that?")


@dataclass(frozen=True)
class TrainingPrompt:
    """A chat to continue: (role, content) messages ending on a user turn. An assistant turn whose content is
    None is the target's own reply, generated when distilling (multi-turn chats)."""

    kind: str  # one of KINDS
    messages: tuple[tuple[str, str | None], ...]

    def text(self) -> str:
        """The prompt's own text (what the suite check reads)."""
        return "\n".join(content for _, content in self.messages if content)


def _pieces(module_name: str) -> list[tuple[str, str]]:
    """(kind, text) pieces of one module: its docstrings ("doc"), short functions' sources ("code") and the
    names of documented functions ("name": "module.function")."""
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
                out.append(("code", source.rstrip()))
            if inspect.getdoc(obj):
                out.append(("name", f"{module_name}.{name}"))
        elif inspect.isclass(obj) and inspect.getdoc(obj) and len(inspect.getdoc(obj)) > 200:
            out.append(("doc", inspect.getdoc(obj)[:1500]))
    return out


def _prose(text: str) -> list[str]:
    """The paragraphs of running prose in a text file (no grammar rules, code or tables), each on one line."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(line.startswith("   ") or "::=" in line or line.startswith(("*", "=", "-", ">>>"))
                            for line in lines):
            continue
        paragraph = " ".join(line.strip() for line in lines)
        if len(paragraph.split()) >= 12:
            out.append(paragraph)
    return out


@cache
def _sources() -> dict[str, list]:
    """Everything the prompts are made from, read once."""
    from pydoc_data.topics import topics

    pieces = [p for name in MODULES for p in _pieces(name)]
    reference = []  # (title, paragraphs) per topic of the language reference
    for key in sorted(topics):
        first = topics[key].strip().splitlines()[0].strip()
        paragraphs = _prose(topics[key])
        if paragraphs:
            reference.append((first.replace('"', "").strip(), paragraphs))
    other = []
    idle = os.path.join(sysconfig.get_paths()["stdlib"], "idlelib")
    for path in [os.path.join(idle, name) for name in _IDLE_NOTES] + [
            os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")]:
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                other += _prose(f.read())
    paragraphs = [p for _, ps in reference for p in ps] + other
    sentences = [s for p in paragraphs for s in re.split(r"(?<=[.!?])\s+", p)
                 if 8 <= len(s.split()) <= 30 and re.fullmatch(r"[A-Za-z ,;'.!?-]+", s)]
    return {"doc": [t for k, t in pieces if k == "doc"], "code": [t for k, t in pieces if k == "code"],
            "name": [t for k, t in pieces if k == "name"], "reference": reference, "paragraphs": paragraphs,
            "sentences": sentences}


def _passage(paragraphs: list[str], rng: random.Random, words: int) -> str:
    """Consecutive paragraphs from a random start, until about `words` words."""
    i = rng.randrange(len(paragraphs))
    chosen = [paragraphs[i]]
    while sum(len(p.split()) for p in chosen) < words and i + 1 < len(paragraphs):
        i += 1
        chosen.append(paragraphs[i])
    return "\n\n".join(chosen)


def _word_problem(rng: random.Random) -> str:
    a, b, c, d = (rng.randint(2, 60) for _ in range(4))
    name, place = rng.choice(_NAMES), rng.choice(_PLACES)
    return rng.choice((
        f"{name} walks to the {place} at {a % 6 + 3} km per hour and cycles back at {b % 15 + 10} km per hour. "
        f"The {place} is {c % 9 + 2} km away. How long does the round trip take?",
        f"A crate holds {a} rows of {b % 12 + 2} jars. The {place} orders {c % 9 + 2} crates and {d} jars break. "
        f"How many jars are left?",
        f"{name} has {a * 10} dollars, spends {b} percent of it at the {place}, then earns {c} dollars. How much "
        f"money is there now?",
        f"A field is {a} metres long and {b} metres wide. Fencing costs {c % 20 + 3} dollars a metre. What does "
        f"fencing the whole field cost?",
        f"{name} reads {a % 30 + 5} pages a day. The book has {b * 11} pages. After how many days is it finished, "
        f"and how many pages are read on the last day?",
        f"Work out ({a} + {b}) x {c} - {d} step by step.",
        f"Four friends split a bill of {a * 7} dollars and add a {5 + b % 4 * 5} percent tip. What does each pay?",
        f"A tank holds {a * 20} litres. It drains {b} litres a minute while a pipe adds {c % b + 1} litres a "
        f"minute. After how many minutes is it empty?",
    ))


def _sentence(rng: random.Random, sentences: list[str]) -> str:
    """One to three sentences to translate: from Python's prose, or an everyday one."""
    if rng.random() < 0.5:
        return " ".join(rng.choice(sentences) for _ in range(rng.randint(1, 2)))
    name, place = rng.choice(_NAMES), rng.choice(_PLACES)
    return rng.choice((f"{name} is going to the {place} tomorrow morning and will be back before lunch.",
                       f"Could you tell me how to get to the {place}? I think I am lost.",
                       f"The {place} closes early on Sundays, so {name} went on Saturday instead.",
                       f"{name} forgot an umbrella at the {place}. It was raining all afternoon."))


def _prompt(kind: str, rng: random.Random, src: dict[str, list]) -> TrainingPrompt:
    def user(text: str) -> TrainingPrompt:
        return TrainingPrompt(kind, (("user", text),))

    if kind == "summarization":
        text = rng.choice(src["doc"]) if rng.random() < 0.3 else _passage(src["paragraphs"], rng, 120)
        return user(rng.choice(_SUMMARIZE).format(text=text))
    if kind == "rag":
        title, paragraphs = rng.choice(src["reference"])
        shown = [_passage(paragraphs, rng, 40)] + [_passage(rng.choice(src["reference"])[1], rng, 30)
                                                  for _ in range(rng.randint(1, 2))]
        rng.shuffle(shown)
        passages = "\n".join(f"({i}) {p}" for i, p in enumerate(shown, 1))
        return user(_RAG.format(passages=passages, question=rng.choice(_RAG_QUESTIONS).format(title=title)))
    if kind == "translation":
        return user(rng.choice(_TRANSLATE).format(lang=rng.choice(_LANGUAGES), text=_sentence(rng, src["sentences"])))
    if kind == "qa":
        a, b = rng.choice(_PAIRS)
        module, _, name = rng.choice(src["name"]).rpartition(".")
        return user(rng.choice(_QUESTIONS).format(thing=rng.choice(_THINGS), a=a, b=b, name=f"{module}.{name}",
                                                  module=module, title=rng.choice(src["reference"])[0]))
    if kind == "math":
        return user(_word_problem(rng))
    if kind == "code_edit":
        return user(rng.choice(_CODE).format(text=rng.choice(src["code"])))
    first = _prompt(rng.choice(("qa", "math", "translation")), rng, src).messages[0][1]
    return TrainingPrompt(kind, (("user", first), ("assistant", None), ("user", rng.choice(_FOLLOW_UPS))))


def training_prompts(count: int, seed: int = 0) -> list[TrainingPrompt]:
    """`count` distinct prompts, the kinds in turn, drawn deterministically from `seed`."""
    src, rng = _sources(), random.Random(seed)
    out: list[TrainingPrompt] = []
    seen: set[TrainingPrompt] = set()
    while len(out) < count:
        prompt = _prompt(KINDS[len(out) % len(KINDS)], rng, src)
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


def _word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def overlaps_suite(prompts: list[TrainingPrompt | str], n: int = 10) -> list[TrainingPrompt | str]:
    """Training prompts sharing a run of `n` words with any benchmark suite prompt (should be none)."""
    from workbench.eval.suite import suite

    suite_grams: set[tuple[str, ...]] = set()
    for item in suite():
        messages = item.prompt if isinstance(item.prompt, list) else [{"content": item.prompt}]
        for message in messages:
            suite_grams |= _word_ngrams(message["content"], n)
    return [p for p in prompts if _word_ngrams(p if isinstance(p, str) else p.text(), n) & suite_grams]
