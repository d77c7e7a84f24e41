"""`workbench eval --lossy`: every lossy decoding technique against plain decoding, speed and quality in one run.

The contenders come from the registry: every technique outside the cache and compression categories that is
registered lossy, with its default parameters. A drafter runs as `decode=<name>` (with its own default
acceptor); an acceptor runs on the drafter it names in a class attribute `default_drafter`, or `draft_model`
(the shallow self-draft, which reports the draft distribution acceptors read). Beside them run plain decoding
(the baseline) and lossless drafters for reference (prompt_lookup and token_recycling by default), and any extra
specs the user adds. All run greedily on the same prompts in one process, the order alternating between
prompts, each technique with its own cross-run memory (as `workbench bench --decode` does).

Prompts: the first `per_category` prompts of each category of the suite (workbench/eval/suite.py), and the
hidden-test coding tasks (workbench/eval/hidden_tests.py) as the category `code_tests`. Coding prompts (code_edit
and code_tests) get their own token budget and stop at the answer's closing code fence, so their code is whole.

Per category and contender:
- decode_speed_up: tokens after the first over the time after the first (the prefill, the same forward for every
  technique, left out), over plain decoding's on the same prompts; speed_up: the same end to end, prefill included;
- tokens_per_forward: output tokens per verification forward; tokens_per_target_forward: per forward through the
  whole target, the drafter's own included (A*'s expansions, AdaDec's lookaheads, Superposed Decoding's passes),
  which says what the technique saved in target forwards;
- agreement_prefix: the mean, over prompts, of the share of plain decoding's tokens that the output reproduces
  before its first difference from plain's output (1 = identical up to plain's length);
- agreement_positions: the mean share of positions (over the longer of the two outputs) holding the same token
  in both, compared position by position, so it also counts agreement after the first difference;
- departure_rate: the share of output tokens that are not the target's argmax given the output so far
  (workbench/divergence.py): the technique's own choices, not the differences that follow from earlier ones;
- target_perplexity: exp of the mean negative log-probability of the output tokens under the target
  (token-weighted over the category); perplexity_ratio: over plain decoding's;
- for code (code_edit and code_tests): parse_rate, the share of outputs whose code (the first fenced block, or
  the whole output) passes `ast.parse`; for code_tests, tests_passed, the share passing the hidden asserts.
A technique whose losslessness depends on the run (typical acceptance: exact at temperature 0) is labelled by
its run (`lossless_in_run`). Techniques that cannot run here (an untrained head, a refused pairing) are listed
under `not_run` with the reason.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from workbench import registry
from workbench.errors import SpecError, WorkbenchError
from workbench.eval.hidden_tests import CodingTask, coding_tasks, extract_code, parses, run_hidden_tests
from workbench.eval.suite import CATEGORIES, suite, suite_hash
from workbench.spec import DEFAULT_MODEL, RunSpec

# torch and the model runtime are imported where they are used: `workbench --help` stays fast.

OTHER_EVALUATIONS = ("cache", "compression")  # lossy too, measured by `workbench eval --cache/--compress`
LOSSLESS_REFERENCES = ("prompt_lookup", "token_recycling")
FALLBACK_DRAFTER = "draft_model"
CODE_TESTS = "code_tests"
CODE_CATEGORIES = ("code_edit", CODE_TESTS)
CODE_END = "\n```"  # a coding answer's closing fence: nothing after it is checked, so generation stops there
ALL_CATEGORIES = (*CATEGORIES, CODE_TESTS)


@dataclass(frozen=True)
class Contender:
    label: str  # what tables show
    spec: str  # a RunSpec short string
    role: str  # baseline, lossless (a reference drafter), lossy, or extra (a spec the user added)
    covers: tuple[str, ...] = ()  # the lossy techniques this run shows (a drafter and its own lossy acceptor: both)


@dataclass(frozen=True)
class EvalPrompt:
    category: str
    id: str
    prompt: str | list[dict[str, str]]
    new_tokens: int
    task: CodingTask | None = None
    stop: tuple[str, ...] = ()


@dataclass
class LossyOptions:
    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    device: str = "auto"
    techniques: list[str] | None = None  # lossy technique names; None: every one in the registry
    lossless: list[str] = field(default_factory=lambda: list(LOSSLESS_REFERENCES))
    extra: list[str] = field(default_factory=list)  # further specs, e.g. "decode=draft_model;accept=typical"
    categories: list[str] | None = None  # None: every suite category and code_tests
    per_category: int = 2
    code_tasks: int | None = None  # None: all
    max_new_tokens: int = 48
    code_new_tokens: int = 96

    def check(self) -> None:
        rules = [(self.per_category >= 1, f"--per-category must be >= 1, got {self.per_category}"),
                 (self.code_tasks is None or self.code_tasks >= 1, f"--code-tasks must be >= 1, got {self.code_tasks}"),
                 (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"),
                 (self.code_new_tokens >= 1, f"--code-new-tokens must be >= 1, got {self.code_new_tokens}")]
        for ok, message in rules:
            if not ok:
                raise SpecError(message)
        unknown = [c for c in self.categories or [] if c not in ALL_CATEGORIES]
        if unknown or self.categories == []:
            raise SpecError(f"unknown categories {unknown}; valid: {', '.join(ALL_CATEGORIES)}")


def lossy_techniques() -> list[registry.Technique]:
    """Every decoding-side technique the registry labels lossy (cache and compression have their own eval)."""
    return [t for t in registry.techniques() if not t.lossless and t.category not in OTHER_EVALUATIONS]


def spec_for(technique: registry.Technique) -> str:
    """The run that shows a lossy technique with its default parameters, as a RunSpec string."""
    if technique.category == "decoding":
        return f"decode={technique.name}"
    if technique.category == "acceptance":
        return f"decode={getattr(technique.cls, 'default_drafter', FALLBACK_DRAFTER)};accept={technique.name}"
    raise SpecError(f"the lossy evaluation does not know where a {technique.category} technique goes in a run spec")


def _drafter_and_acceptor(spec: str) -> tuple[str, str]:
    """The (drafter, acceptor) a run spec string uses: the drafter's default acceptor when it names none."""
    run = RunSpec.parse(spec)
    drafter = registry.get("decoding", run.decode.name).cls
    return run.decode.name, run.accept.name if run.accept else drafter.default_acceptor


def contenders(options: LossyOptions) -> tuple[list[Contender], list[dict[str, str]]]:
    """Plain decoding first, the lossless references, the lossy techniques, the extra specs; and the lossy
    techniques that have no run spec (name and reason)."""
    lossy = lossy_techniques()
    if options.techniques is not None:
        names = {t.name for t in lossy}
        unknown = [n for n in options.techniques if n not in names]
        if unknown:
            raise SpecError(f"not a lossy decoding technique: {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        lossy = [t for t in lossy if t.name in options.techniques]
    else:  # names starting with "_" are stand-ins registered by tests, evaluated only when named
        lossy = [t for t in lossy if not t.name.startswith("_")]
    out = [Contender("plain", "decode=plain", "baseline")]
    out += [Contender(name, f"decode={name}", "lossless") for name in options.lossless if name != "plain"]
    not_run, runs = [], {}  # runs: (drafter, acceptor) -> the contender that shows that pair
    for t in lossy:
        try:
            spec = spec_for(t)
        except SpecError as err:
            not_run.append({"technique": t.name, "category": t.category, "reason": str(err)})
            continue
        pair = _drafter_and_acceptor(spec)
        seen = runs.get(pair)  # e.g. decode=adadec runs its acceptor `decided`, which names adadec as its drafter
        covers = tuple(dict.fromkeys((*seen.covers, t.name))) if seen else (t.name,)
        runs[pair] = Contender(seen.label if seen else t.name, seen.spec if seen else spec, "lossy", covers)
    out += runs.values()
    out += [Contender(spec, spec, "extra") for spec in options.extra]
    return out, not_run


def eval_prompts(options: LossyOptions) -> list[EvalPrompt]:
    categories = options.categories or list(ALL_CATEGORIES)
    items = [EvalPrompt(p.category, p.id, p.prompt, options.max_new_tokens) if p.category not in CODE_CATEGORIES
             else EvalPrompt(p.category, p.id, p.prompt, options.code_new_tokens, stop=(CODE_END,))
             for p in suite([c for c in categories if c != CODE_TESTS], options.per_category)]
    if CODE_TESTS in categories:
        tasks = coding_tasks()[: options.code_tasks]
        items += [EvalPrompt(CODE_TESTS, f"{CODE_TESTS}-{t.id}", t.chat_prompt, options.code_new_tokens, t,
                             stop=(CODE_END,)) for t in tasks]
    return items


def agreement(tokens: list[int], plain: list[int]) -> tuple[float, float, int | None]:
    """(agreement_prefix, agreement_positions, first_difference) of an output against plain decoding's."""
    same = [a == b for a, b in zip(tokens, plain)]
    first = next((i for i, s in enumerate(same) if not s), None)
    if first is None and len(tokens) != len(plain):
        first = min(len(tokens), len(plain))
    prefix = len(plain) if first is None else first
    longest = max(len(tokens), len(plain))
    return (min(prefix, len(plain)) / len(plain) if plain else 1.0,
            sum(same) / longest if longest else 1.0, first)


def evaluate_lossy(options: LossyOptions, progress: bool = True) -> dict[str, Any]:
    """Run every contender on every prompt and return the results as a JSON-ready dict."""
    import torch
    from tqdm import tqdm

    from workbench.api import Workbench, hardware_description
    from workbench.bench import WARMUP_PROMPT
    from workbench.eval.quality import decode, encode
    from workbench.kernels import dispatch
    from workbench.provenance import provenance

    options.check()
    planned, not_run = contenders(options)
    items = eval_prompts(options)
    load_before = os.getloadavg()
    wb = Workbench(options.model, options.dtype, options.device, freeze_gc=True)
    loaded = wb.model(wb.spec())

    def as_input(prompt: str | list[dict[str, str]]) -> tuple[str | list[dict[str, str]], dict[str, Any]]:
        if loaded.tokenizer is not None:
            return prompt, {}
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return " ".join(map(str, encode(loaded, text))), {"chat": False}  # no tokenizer: UTF-8 bytes as ids

    specs, memories, runnable = {}, {}, []
    for c in planned:  # validate, then warm up on a text outside the suite (first calls pay for allocation)
        try:
            specs[c.label] = wb.spec(c.spec)
            memories[c.label] = {}
            prompt, chat = as_input(WARMUP_PROMPT)
            wb.generate(prompt, specs[c.label], memory=memories[c.label], max_new_tokens=8, **chat)
            runnable.append(c)
        except Exception as err:  # one technique that cannot run (or is broken) must not stop the others
            if c.role == "baseline":
                raise
            reason = str(err) if isinstance(err, WorkbenchError) else f"failed: {type(err).__name__}: {err}"
            not_run.append({"technique": c.label, "spec": c.spec, "reason": reason})

    runs: list[dict[str, Any]] = []
    outputs: dict[tuple[str, str], list[int]] = {}
    bar = tqdm(total=len(items) * len(runnable), desc="lossy eval", unit="run", disable=not progress)
    with dispatch.recording() as used:
        for i, item in enumerate(items):
            prompt, chat = as_input(item.prompt)
            for c in list(runnable) if i % 2 == 0 else list(reversed(runnable)):
                bar.set_postfix_str(f"{item.id} {c.label}"[:60])
                trace = wb.generate(prompt, specs[c.label], memory=memories[c.label],
                                    max_new_tokens=item.new_tokens, stop=list(item.stop), **chat)
                s = trace.summary()
                outputs[(item.id, c.label)] = trace.token_ids
                run = {"id": item.id, "category": item.category, "engine": c.label, "new_tokens": s["n_new_tokens"],
                       "seconds": s["total_s"], "decode_seconds": s["total_s"] - s["ttft_s"],
                       "target_forwards": s["target_forwards"], "drafter_forwards": s["drafter_forwards"],
                       "departures": s["departures"], "target_perplexity": s["target_perplexity"],
                       "lossless": s["lossless"]}
                if item.category in CODE_CATEGORIES:
                    text = trace.text if loaded.tokenizer is not None else decode(loaded, trace.token_ids)
                    code = extract_code(text)
                    run.update(text=text, parses=parses(code))
                    if item.task is not None:
                        outcome = run_hidden_tests(code, item.task)
                        run.update(tests_passed=outcome.passed, test_result=outcome.reason)
                runs.append(run)
                bar.update(1)
    bar.close()
    for run in runs:
        run["agreement_prefix"], run["agreement_positions"], run["first_difference"] = agreement(
            outputs[(run["id"], run["engine"])], outputs[(run["id"], "plain")])

    categories = list(dict.fromkeys(item.category for item in items)) + ["all"]
    rows = [aggregate(category, c, [r for r in runs if r["engine"] == c.label and category in ("all", r["category"])])
            for category in categories for c in runnable]
    for category in categories:
        plain = next(r for r in rows if r["category"] == category and r["engine"] == "plain")
        for row in (r for r in rows if r["category"] == category):
            row["speed_up"] = row["tok_per_s"] / plain["tok_per_s"]
            row["decode_speed_up"] = row["decode_tok_per_s"] / plain["decode_tok_per_s"]
            ppl, base = row["target_perplexity"], plain["target_perplexity"]
            row["perplexity_ratio"] = ppl / base if ppl and base else None
    mark_wins(rows, runnable)
    return {
        "command": "", "model": loaded.name, "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device), "machine": hardware_description(loaded.device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "provenance": provenance(loaded.model, loaded.device, loaded.dtype, used),
        "suite_hash": suite_hash(), "options": asdict(options), "greedy": True,
        "contenders": [asdict(c) for c in runnable], "not_run": not_run,
        "prompts": {c: sum(1 for it in items if it.category == c) for c in categories[:-1]},
        "rows": rows, "runs": runs,
    }


def aggregate(category: str, contender: Contender, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One contender over one category's runs (see the module docstring for each figure)."""
    tokens = sum(r["new_tokens"] for r in runs)
    scored = [r for r in runs if r["target_perplexity"] and r["new_tokens"]]
    n_scored = sum(r["new_tokens"] for r in scored)
    counted = [r for r in runs if r["departures"] is not None]
    row = {"category": category, "engine": contender.label, "spec": contender.spec, "role": contender.role,
           "covers": list(contender.covers),
           "lossless_in_run": all(r["lossless"] for r in runs), "prompts": len(runs), "new_tokens": tokens,
           "tok_per_s": tokens / sum(r["seconds"] for r in runs),
           # after the first token (the prefill's, the same forward for every technique)
           "decode_tok_per_s": sum(r["new_tokens"] - 1 for r in runs) / max(1e-9, sum(r["decode_seconds"]
                                                                                         for r in runs)),
           "tokens_per_forward": tokens / max(1, sum(r["target_forwards"] for r in runs)),
           # the drafter's own forwards through the whole target (search, lookaheads) counted too
           "tokens_per_target_forward": tokens / max(1, sum(r["target_forwards"] + r.get("drafter_forwards", 0)
                                                            for r in runs)),
           "agreement_prefix": statistics.mean(r["agreement_prefix"] for r in runs),
           "agreement_positions": statistics.mean(r["agreement_positions"] for r in runs),
           "departure_rate": (sum(r["departures"] for r in counted) / max(1, sum(r["new_tokens"] for r in counted))
                              if counted else None),
           "target_perplexity": math.exp(sum(r["new_tokens"] * math.log(r["target_perplexity"]) for r in scored)
                                         / n_scored) if n_scored else None}
    code = [r for r in runs if "parses" in r]
    tested = [r for r in runs if "tests_passed" in r]
    row["parse_rate"] = sum(r["parses"] for r in code) / len(code) if code else None
    row["tests_passed"] = sum(r["tests_passed"] for r in tested) / len(tested) if tested else None
    return row


def mark_wins(rows: list[dict[str, Any]], runnable: list[Contender]) -> None:
    """faster_than_lossless: whether a row's decode speed-up beats every lossless reference drafter's in its
    category."""
    references = [c.label for c in runnable if c.role == "lossless"]
    for row in rows:
        rivals = [r["decode_speed_up"] for r in rows if r["category"] == row["category"] and r["engine"] in references]
        row["faster_than_lossless"] = bool(rivals) and row["role"] in ("lossy", "extra") and \
            row["decode_speed_up"] > max(rivals)


def _name(row: dict[str, Any]) -> str:
    """A row's engine, and the other lossy techniques its run also shows."""
    more = [f"`{n}`" for n in row.get("covers", []) if n != row["engine"]]
    return f"`{row['engine']}`" + (f" (with {', '.join(more)})" if more else "")


def _cell(value: Any, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


COLUMNS = ("technique", "run spec", "lossless", "speed-up (decode)", "speed-up (end to end)",
           "tokens/forward (/target forward)", "agreement (prefix)", "agreement (positions)", "departure rate",
           "perplexity (x plain)", "code parses", "hidden tests", "faster than the lossless drafters in")


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown tables: all prompts together, then speed-up and agreement per category."""
    rows = result["rows"]
    overall = [r for r in rows if r["category"] == "all"]
    categories = [c for c in dict.fromkeys(r["category"] for r in rows) if c != "all"]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in overall:
        wins = [c for c in categories for x in rows if x["category"] == c and x["engine"] == r["engine"]
                and x["faster_than_lossless"]]
        wins_text = ("all prompts; " if r["faster_than_lossless"] else "") + (", ".join(wins) or "none")
        cells = [_name(r), f"`{r['spec']}`", "yes" if r["lossless_in_run"] else "**no**",
                 f"{r['decode_speed_up']:.2f}x", f"{r['speed_up']:.2f}x",
                 f"{r['tokens_per_forward']:.2f} ({r.get('tokens_per_target_forward', r['tokens_per_forward']):.2f})",
                 f"{r['agreement_prefix']:.2f}", f"{r['agreement_positions']:.2f}", _cell(r["departure_rate"]),
                 f"{_cell(r['target_perplexity'])} ({_cell(r['perplexity_ratio'])})",
                 _cell(r["parse_rate"], "{:.0%}"), _cell(r["tests_passed"], "{:.0%}"),
                 wins_text if r["role"] in ("lossy", "extra") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    for title, key, fmt in (("decode speed-up over plain decoding", "decode_speed_up", "{:.2f}x"),
                            ("agreement with plain decoding (prefix)", "agreement_prefix", "{:.2f}")):
        lines += ["", f"{title}, per category:", "",
                  "| technique | " + " | ".join(categories) + " |", "|" + " --- |" * (len(categories) + 1)]
        for r in overall:
            cells = [fmt.format(next(x[key] for x in rows if x["category"] == c and x["engine"] == r["engine"]))
                     for c in categories]
            lines.append(f"| `{r['engine']}` | " + " | ".join(cells) + " |")
    for item in result["not_run"]:
        lines.append(f"\nnot run: `{item['technique']}`: {item['reason']}")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str) -> None:
    """Speed-up against two quality costs (1 - token agreement; perplexity over plain's), one point each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = [r for r in result["rows"] if r["category"] == "all" and r["engine"] != "plain"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = (("1 - token agreement with plain decoding (positions)", lambda r: 1 - r["agreement_positions"]),
              ("target perplexity of the output / plain decoding's", lambda r: r["perplexity_ratio"]))
    for ax, (label, cost) in zip(axes, panels):
        for r in overall:
            y = cost(r)
            if y is None:
                continue
            lossless = r["role"] == "lossless"
            ax.scatter(r["decode_speed_up"], y, marker="o" if lossless else "^",
                       color="tab:blue" if lossless else "tab:red")
            name = r["engine"] + (" (exact in this run)" if not lossless and r["lossless_in_run"] else "")
            ax.annotate(name, (r["decode_speed_up"], y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axvline(1.0, color="grey", linewidth=1)
        ax.set_xlabel("decode speed-up over plain decoding (all prompts)")
        ax.set_ylabel(label)
    axes[0].set_title("blue circles: lossless drafters; red triangles: lossy", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `workbench eval --lossy` (defaults None here: given without --lossy is an error)."""
    g = p.add_argument_group("lossy decoding (--lossy): speed and quality against plain decoding, one run")
    g.add_argument("--lossy", action="store_true", help="evaluate every lossy decoding technique in the registry "
                   "against plain decoding and lossless drafters on the suite and hidden-test coding prompts")
    g.add_argument("--techniques", help="comma-separated lossy techniques (default: every one registered)")
    g.add_argument("--lossless-drafters", help=f"lossless drafters run for reference (default "
                   f"{','.join(LOSSLESS_REFERENCES)}; '' for none)")
    g.add_argument("--also", action="append", help="a further run spec to evaluate, e.g. "
                   "'decode=draft_model;accept=lexical_unit:threshold=0.6' (repeatable)")
    g.add_argument("--categories", help=f"comma-separated, of {', '.join(ALL_CATEGORIES)} (default all)")
    g.add_argument("--per-category", type=int, help="suite prompts per category (default 2)")
    g.add_argument("--code-tasks", type=int, help="hidden-test coding tasks (default all)")
    g.add_argument("--max-new-tokens", type=int, help="new tokens per suite prompt (default 48)")
    g.add_argument("--code-new-tokens", type=int, help="new tokens per coding prompt, code_edit and code_tests "
                   "(default 96; generation stops earlier at the answer's closing code fence)")


LOSSY_ONLY = ("techniques", "lossless_drafters", "also", "categories", "per_category", "code_tasks",
              "max_new_tokens", "code_new_tokens")


def check_arguments(args: argparse.Namespace) -> None:
    """Options of one evaluation given to the other are refused, not ignored."""
    if not args.lossy:
        given = [name for name in LOSSY_ONLY if getattr(args, name) is not None]
        if given:
            raise SpecError(f"--{given[0].replace('_', '-')} applies to `workbench eval --lossy` only")
        return
    clashes = [name for name, value in (("cache", args.cache), ("compress", args.compress), ("budgets", args.budgets),
                                        ("combine", args.combine), ("peers", args.peers)) if value]
    if clashes:
        raise SpecError(f"--{clashes[0]} belongs to the cache and weight evaluation; --lossy evaluates decoding "
                        "techniques on the plain model and dense cache")


def options_from_args(args: argparse.Namespace) -> LossyOptions:
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    defaults = LossyOptions()
    return LossyOptions(
        model=args.model, dtype=args.dtype, device=args.device,
        techniques=split(args.techniques) if args.techniques is not None else None,
        lossless=split(args.lossless_drafters) if args.lossless_drafters is not None else defaults.lossless,
        extra=list(args.also or []), categories=split(args.categories) if args.categories is not None else None,
        code_tasks=args.code_tasks,
        **{name: getattr(args, name) if getattr(args, name) is not None else getattr(defaults, name)
           for name in ("per_category", "max_new_tokens", "code_new_tokens")})


def run_lossy_command(args: argparse.Namespace, command: str) -> int:
    import json
    import sys
    from pathlib import Path

    t0 = time.perf_counter()
    result = evaluate_lossy(options_from_args(args))
    result["command"], result["wall_s"] = command, time.perf_counter() - t0
    print(json.dumps(result) if args.json else markdown(result))
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
        plot(result, str(out.with_suffix(".png")))
        for path in (out, out.with_suffix(".md"), out.with_suffix(".png")):
            print(f"wrote {path}", file=sys.stderr)
    return 0
