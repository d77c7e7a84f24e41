"""`workbench eval`: plan the runs, measure each against the full-cache, uncompressed reference, add peers.

A run is one cache-policy chain (at each of `budgets`, for chains with a policy that takes a fraction of the
context: `fraction` or a fractional `budget`) on the
uncompressed model, or one weight-transform chain with the dense cache, or (`combine`) both. The reference
is the dense cache on the uncompressed model in the same dtype. Every run is scored with the protocol of
`workbench.eval.quality`; retrieval tasks run through `Workbench.generate`; the kvpress peer runs the
presses that match a policy (`workbench.eval.kvpress_peer`). The result is one JSON-ready dict.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workbench import registry
from workbench.errors import PromptError, SpecError
from workbench.eval import retrieval
from workbench.spec import DEFAULT_MODEL, RunSpec, TechniqueSpec
from workbench.text import evaluation_text, text_hash

if TYPE_CHECKING:
    from workbench.eval.quality import Forced

# torch, the model runtime and kvpress are imported where they are used: `workbench --help` stays fast.

TASKS = ("ppl", "passkey", "kv")
PEERS = ("kvpress",)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class EvalOptions:
    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    device: str = "auto"
    cache: list[str] = field(default_factory=list)  # policy chains, e.g. "h2o" or "snapkv+kivi:bits=4"
    compress: list[str] = field(default_factory=list)  # transform chains, e.g. "gptq+eora:rank=32"
    budgets: list[float] | None = None  # sets `budget` on every policy of a chain that has one
    combine: bool = False  # also run every cache chain on every compressed model
    tasks: list[str] = field(default_factory=lambda: ["ppl"])
    context: int = 2048  # tokens per window (prefill + scored)
    scored: int = 256  # tokens scored per window, one decoding step each
    windows: int = 1  # consecutive windows of the evaluation text
    lengths: list[int] | None = None  # retrieval prompt lengths; default context/4, context/2, context
    depths: list[float] = field(default_factory=lambda: list(DEPTHS))
    trials: int = 1  # retrieval prompts per (length, depth)
    peers: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Raise SpecError for anything that cannot run, before any model is loaded."""
        rules = [
            (self.context >= 2, f"--context must be at least 2 tokens, got {self.context}"),
            (1 <= self.scored < self.context,
             f"--scored must be between 1 and context - 1 = {self.context - 1}, got {self.scored}"),
            (self.windows >= 1, f"--windows must be >= 1, got {self.windows}"),
            (self.trials >= 1, f"--trials must be >= 1, got {self.trials}"),
            (all(0 <= d <= 1 for d in self.depths) and bool(self.depths),
             f"--depths are fractions in [0, 1], got {self.depths}"),
            (all(n >= 1 for n in self.lengths or []), f"--lengths must be positive, got {self.lengths}"),
        ]
        for ok, message in rules:
            if not ok:
                raise SpecError(message)
        for budget in self.budgets or []:
            if not 0 < budget <= 1:
                raise SpecError(f"budget {budget} is out of range: a budget is the fraction of the context's "
                                "tokens a policy keeps, in (0, 1]")
        unknown = set(self.tasks) - set(TASKS)
        if unknown or not self.tasks:
            raise SpecError(f"unknown tasks {sorted(unknown)}; valid: {', '.join(TASKS)}")
        unknown = set(self.peers) - set(PEERS)
        if unknown:
            raise SpecError(f"unknown peers {sorted(unknown)}; valid: {', '.join(PEERS)}")
        if self.peers and "ppl" not in self.tasks:
            raise SpecError("the kvpress peer is compared on perplexity and KL: add ppl to --tasks")

    @property
    def retrieval_lengths(self) -> list[int]:
        return self.lengths or sorted({max(self.context // 4, 1), max(self.context // 2, 1), self.context})


@dataclass
class PlannedRun:
    label: str
    cache: list[TechniqueSpec]
    compress: list[TechniqueSpec]
    budget: float | None = None
    series: str = ""  # what the user asked for, budget aside: one line in the quality-vs-bytes plot

    @property
    def kind(self) -> str:
        return "reference" if not (self.cache or self.compress) else "cache" if not self.compress else \
            "compress" if not self.cache else "combined"


def _chain(text: str, category: str) -> list[TechniqueSpec]:
    """A `+`-joined chain, each technique checked and its parameters coerced (SpecError otherwise)."""
    return [TechniqueSpec.parse(t).validated(category) for t in text.split("+") if t.strip()]


def _fraction_param(t: TechniqueSpec) -> str | None:
    """The parameter holding a policy's budget as a fraction of the context: `fraction` (streaming, h2o, snapkv,
    whose `budget` counts tokens), else a float `budget` (ems, prefix_kv, double_sparsity); None without one."""
    params = {p.name: p for p in registry.get("cache", t.name).params}
    if "fraction" in params:
        return "fraction"
    return "budget" if "budget" in params and params["budget"].type == "float" else None


def _has_budget(t: TechniqueSpec) -> bool:
    return _fraction_param(t) is not None


def _budget(chain: list[TechniqueSpec]) -> float | None:
    """The fraction of the context the chain keeps: that of its first policy with a fraction parameter (given or
    default); None when that policy keeps an absolute number of tokens (fraction=0) or none has one."""
    value = next((float(getattr(t.build("cache"), _fraction_param(t))) for t in chain if _has_budget(t)), None)
    return value or None


def plan_runs(options: EvalOptions) -> list[PlannedRun]:
    """The reference first, then every run the options ask for, each validated as a RunSpec."""
    options.check()
    cache_runs: list[PlannedRun] = []
    for text in options.cache:
        chain = _chain(text, "cache")
        named = any("budget" in t.params or "fraction" in t.params for t in chain)  # a budget written is kept
        if options.budgets and any(_has_budget(t) for t in chain) and not named:
            for b in options.budgets:
                with_budget = [TechniqueSpec(t.name, {**t.params, _fraction_param(t): b}) if _has_budget(t) else t
                               for t in chain]
                cache_runs.append(PlannedRun("", with_budget, [], b, text))
        else:
            cache_runs.append(PlannedRun("", chain, [], _budget(chain), text))
    if options.budgets and not any(any(_has_budget(t) for t in r.cache) for r in cache_runs):
        raise SpecError("--budgets was given but no --cache policy takes a fraction of the context (`fraction`, or "
                        "a fractional `budget`; see `workbench list --category cache`)")
    compress_runs = [PlannedRun("", [], _chain(text, "compression")) for text in options.compress]
    combined = [PlannedRun("", c.cache, k.compress, c.budget, c.series) for c in cache_runs for k in compress_runs] \
        if options.combine else []
    runs = [PlannedRun("", [], []), *cache_runs, *compress_runs, *combined]
    for run in runs:
        spec = RunSpec(model=options.model, dtype=options.dtype, device=options.device, cache=run.cache,
                       compress=run.compress).validated()
        run.cache, run.compress = spec.cache, spec.compress
        run.label = label(spec)
    return runs


def label(spec: RunSpec) -> str:
    parts = [f"cache={'+'.join(t.to_string() for t in spec.cache)}"] if spec.cache else []
    parts += [f"compress={'+'.join(t.to_string() for t in spec.compress)}"] if spec.compress else []
    return ";".join(parts) or "full (dense, uncompressed)"


def evaluate(options: EvalOptions, progress: bool = True) -> dict[str, Any]:
    """Run every planned run (and peer) and return the results as a JSON-ready dict."""
    import torch
    from tqdm import tqdm

    from workbench.api import Workbench, hardware_description
    from workbench.eval.quality import compare, encode, evaluation_windows, run_windows, teacher_forced

    runs = plan_runs(options)
    t0 = time.perf_counter()
    wb = Workbench(options.model, options.dtype, options.device, freeze_gc=True)
    base_load_s = time.perf_counter() - t0
    base = wb.model(wb.spec())
    window = base.config.context_window
    if "ppl" in options.tasks and options.context > window:
        raise PromptError(f"--context {options.context} is longer than the model's context window ({window}); "
                          f"use at most {window}")
    tasks = set(options.tasks)
    lengths = options.retrieval_lengths
    if tasks & {"passkey", "kv"}:
        longest = max(lengths) + retrieval.KV_NEW_TOKENS
        if longest > window:
            raise PromptError(f"retrieval length {max(lengths)} plus {retrieval.KV_NEW_TOKENS} answer tokens is "
                              f"longer than the model's context window ({window})")
    windows = evaluation_windows(base, options.context, options.windows) if "ppl" in tasks else []
    count = lambda text: len(encode(base, text))  # noqa: E731
    probes = {task: retrieval.probes(task, lengths, list(options.depths), options.trials, count)
              for task in ("passkey", "kv") if task in tasks}
    prefill = options.context - options.scored
    text = evaluation_text()
    result: dict[str, Any] = {
        "model": base.name, "dtype": str(base.dtype).removeprefix("torch."), "device": str(base.device),
        "hardware": hardware_description(base.device), "machine": platform.machine(), "torch": torch.__version__,
        "text": "pydoc_data.topics (evaluation_text)", "text_hash": text_hash(text),
        "context": options.context, "scored": options.scored, "prefill": prefill, "windows": options.windows,
        "tasks": list(options.tasks), "retrieval": {"lengths": lengths, "depths": list(options.depths),
                                                     "trials": options.trials},
        "base_load_s": base_load_s, "options": dataclasses.asdict(options), "rows": [],
    }
    with_peer = "kvpress" in options.peers
    peer_runs = _peer_plan(runs) if with_peer else []
    bar = tqdm(total=len(runs) + (len(peer_runs) + 1 if with_peer else 0), desc="eval", unit="run",
               disable=not progress)
    reference: list[Forced] = []
    ours: dict[str, list[Forced]] = {}  # kept only for the runs a peer is compared with (they are large)
    compared = {run.label for run, _, _ in peer_runs}
    ref_row: dict[str, Any] = {}
    for run in runs:
        bar.set_postfix_str(run.label[:60])
        spec = wb.spec(cache=run.cache, compress=run.compress)
        t0 = time.perf_counter()
        loaded = wb.model(spec)
        load_s = time.perf_counter() - t0
        row: dict[str, Any] = {"engine": "workbench", "label": run.label, "kind": run.kind, "budget": run.budget,
                               "series": run.series or run.label,
                               "cache": "+".join(t.to_string() for t in run.cache) or "dense",
                               "compress": "+".join(t.to_string() for t in run.compress) or "none",
                               "simulated": any(t.build("cache").simulated for t in run.cache),
                               "weight_bytes": loaded.weight_bytes()}
        if run.compress:
            reports = getattr(loaded, "compression", [])  # TransformReports, where the API records them
            row.update(load_and_apply_s=load_s, transforms=[dataclasses.asdict(r) for r in reports])
            if reports:
                row.update(apply_s=sum(r.seconds for r in reports), speed_simulated=any(r.simulated for r in reports))
        if "ppl" in tasks:
            forced, stats = run_windows(
                lambda ids, s=spec, m=loaded.model, tok=loaded.tokenizer: teacher_forced(
                    m, [t.build("cache") for t in s.cache], ids, prefill, tok, wb.memory(s)), windows)
            if run.kind == "reference":
                reference = forced
            if run.label in compared:
                ours[run.label] = forced
            row.update(compare(reference, forced), **stats)
        for task, cells in probes.items():
            row[task] = retrieval.run_task(task, cells, _generator(wb, spec, loaded))
        if run.kind == "reference":
            ref_row = row
        _ratios(row, ref_row)
        result["rows"].append(row)
        bar.update(1)
    if with_peer:
        result["rows"] += _peer_rows(base, peer_runs, windows, prefill, reference, ours, ref_row, bar)
    bar.close()
    return result


def _ratios(row: dict[str, Any], ref: dict[str, Any]) -> None:
    """Bytes as a fraction of the reference's (the dense cache; the uncompressed weights)."""
    for key in ("cache_bytes_prefill", "cache_bytes_end", "weight_bytes"):
        if key in row and ref.get(key):
            row[key.replace("bytes", "ratio")] = row[key] / ref[key]


def _generator(wb, spec: RunSpec, loaded):
    """generate(prompt text, max_new_tokens) -> answer text, greedy plain decoding with the run's spec."""
    from workbench.eval.quality import decode, encode

    def generate(prompt: str, new_tokens: int) -> str:
        text = prompt if loaded.tokenizer is not None else " ".join(map(str, encode(loaded, prompt)))
        trace = wb.generate(text, spec, chat=False, max_new_tokens=new_tokens, temperature=0.0)
        return trace.text if loaded.tokenizer is not None else decode(loaded, trace.token_ids)

    return generate


def _peer_plan(runs: list[PlannedRun]) -> list[tuple[PlannedRun, Any, bool]]:
    """(our run, the kvpress press, same method?) for every single-policy run with a kvpress counterpart."""
    from workbench.eval import kvpress_peer

    out = []
    for run in runs:
        if run.kind == "cache" and len(run.cache) == 1 and run.budget is not None:
            policy = run.cache[0].build("cache")
            match = kvpress_peer.press_for(run.cache[0].name, policy, run.budget)
            if match is not None:
                out.append((run, *match))
    return out


def _peer_rows(base, peer_runs, windows, prefill, reference, ours, ref_row, bar) -> list[dict[str, Any]]:
    from transformers.utils import logging as hf_logging

    from workbench.bench import transformers_peer
    from workbench.eval import kvpress_peer
    from workbench.eval.quality import compare, run_windows

    hf_logging.disable_progress_bar()  # its weight-loading bar would interleave with ours
    model = transformers_peer(base, base.dtype)
    kvpress_peer.require_kvpress()
    version = _version("kvpress")

    def measure(press) -> tuple[list[Forced], dict[str, Any]]:
        forced, stats = run_windows(lambda ids: kvpress_peer.peer_forced(model, press, ids, prefill), windows)
        row = {"engine": "kvpress", "kvpress": version, "press": repr(press) if press else "none (full cache)",
               **compare(reference, forced), **stats}
        _ratios(row, ref_row)
        return forced, row

    bar.set_postfix_str("kvpress full cache")
    full, full_row = measure(None)
    full_row.update(label="kvpress: full cache", kind="peer-reference", budget=None)
    rows = [full_row]
    bar.update(1)
    for run, press, exact in peer_runs:
        bar.set_postfix_str(f"kvpress {type(press).__name__} {run.budget}")
        forced, row = measure(press)
        row.update(label=f"kvpress: {type(press).__name__}", kind="peer", budget=run.budget, peer_of=run.label,
                   series=f"kvpress {type(press).__name__}",
                   same_method=exact,
                   **kvpress_peer.agreement(ours[run.label], forced, reference, full))
        rows.append(row)
        bar.update(1)
    return rows


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _command_line() -> str:
    """The command as typed, for the results file (empty when not run as `workbench`)."""
    import shlex
    from pathlib import Path

    return shlex.join(["workbench", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("workbench", "cli.py") else ""


def _list(text: str | None, kind: type, option: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecError(f"{option} takes comma-separated {kind.__name__}s, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `workbench eval`."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or path (default: the embedded SmolLM2-135M)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--cache", action="append", default=[],
                   help="cache policy to evaluate, e.g. h2o or snapkv+kivi:bits=4 (repeatable: one run each)")
    p.add_argument("--compress", action="append", default=[],
                   help="weight transform to evaluate, e.g. int8 or gptq+eora:rank=32 (repeatable: one run each)")
    p.add_argument("--budgets", help="comma-separated budgets in (0, 1], e.g. 0.25,0.5,0.75: one run per budget of "
                   "each --cache policy that takes a fraction of the context's tokens kept (set as its `fraction`, "
                   "or its `budget` where that is a fraction)")
    p.add_argument("--combine", action="store_true", help="also run every --cache policy on every --compress model")
    p.add_argument("--tasks", default="ppl", help=f"comma-separated, of {', '.join(TASKS)} (default ppl)")
    p.add_argument("--context", type=int, default=2048, help="tokens per window: prefill + scored (default 2048)")
    p.add_argument("--scored", type=int, default=256, help="tokens scored per window, one step each (default 256)")
    p.add_argument("--windows", type=int, default=1, help="consecutive windows of the text (default 1)")
    p.add_argument("--lengths", help="retrieval prompt lengths (default: context/4, context/2, context)")
    p.add_argument("--depths", default=",".join(map(str, DEPTHS)), help="retrieval depths, fractions in [0, 1]")
    p.add_argument("--trials", type=int, default=1, help="retrieval prompts per length and depth (default 1)")
    p.add_argument("--peers", default="", help="comma-separated peers: kvpress (its presses for the policies both "
                   "have, at the same budgets)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    p.add_argument("--out", help="write the JSON here, the table beside it (.md) and the plots (.png)")
    from workbench.eval.lossy import add_arguments as add_lossy_arguments

    add_lossy_arguments(p)


def run_command(args: argparse.Namespace) -> int:
    from workbench.eval.lossy import check_arguments, run_lossy_command
    from workbench.eval.report import markdown, write

    check_arguments(args)
    if args.lossy:
        return run_lossy_command(args, _command_line())
    options = EvalOptions(
        model=args.model, dtype=args.dtype, device=args.device, cache=list(args.cache),
        compress=list(args.compress), budgets=_list(args.budgets, float, "--budgets"), combine=args.combine,
        tasks=_list(args.tasks, str, "--tasks") or [], context=args.context, scored=args.scored,
        windows=args.windows, lengths=_list(args.lengths, int, "--lengths"),
        depths=_list(args.depths, float, "--depths") or [], trials=args.trials,
        peers=_list(args.peers, str, "--peers") or [])
    result = evaluate(options)
    print(json.dumps(result) if args.json else markdown(result))
    if args.out:
        for path in write(result, args.out):
            print(f"wrote {path}", file=sys.stderr)
    return 0
