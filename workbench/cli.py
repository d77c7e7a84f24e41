"""The `workbench` command line: generate, bench, train, sweep, list, runs, sql, export, import and app.

Every command turns user mistakes (WorkbenchError) into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.spec import DEFAULT_MODEL, RunSpec, TechniqueSpec
from workbench.store.commands import add_commands as add_store_commands
from workbench.store.commands import add_recording_options


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run spec (see `workbench list` for techniques and their parameters)")
    g.add_argument("--spec", default="", help="a whole spec as a short string, e.g. "
                   "'decode=prompt_lookup:k=8;temperature=0.7'; the options below override it")
    g.add_argument("--model", help=f"model name, .gguf file, Hugging Face folder or cached hub id "
                   f"(default {DEFAULT_MODEL}, the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto picks bfloat16 where the CPU runs it fast")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--decode", help="decoding technique, e.g. plain or prompt_lookup:k=8")
    g.add_argument("--accept", help="acceptance rule (default: the drafter's own)")
    g.add_argument("--cache", action="append", help="cache policy; repeat or join with + to compose")
    g.add_argument("--compress", action="append", help="weight transform; repeat or join with + to compose")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float, help="0 is greedy (the default)")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", default=None, help="always generate max-new-tokens")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the chat template (default: on when the model has one)")
    g.add_argument("--graphs", choices=["auto", "on", "off", "compile"],
                   help="the static decoding step: auto (CUDA graphs on CUDA, off elsewhere), on, off, or compile "
                        "(torch.compile reduce-overhead)")


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    spec = RunSpec.parse(args.spec)
    simple = ("model", "dtype", "device", "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed",
              "ignore_eos", "chat", "graphs")
    for name in simple:
        if getattr(args, name) is not None:
            setattr(spec, name, getattr(args, name))
    if args.decode:
        spec.decode = TechniqueSpec.parse(args.decode)
    if args.accept:
        spec.accept = TechniqueSpec.parse(args.accept)
    for name in ("cache", "compress"):
        given = getattr(args, name)
        if given and name == "compress":
            from workbench.compression.plan import expand_plan_files

            given = expand_plan_files(given)
        if given:
            setattr(spec, name, [TechniqueSpec.parse(t) for item in given for t in item.split("+") if t.strip()])
    if args.stop:
        spec.stop = list(args.stop)
    return spec.validated()


def cmd_generate(args: argparse.Namespace) -> int:
    from workbench.store.commands import open_recorder

    store = open_recorder(args)  # first: a second writer is refused before the spec's technique code loads
    try:
        spec = spec_from_args(args)
        kv_file_options(spec, args)
    except BaseException:
        if store is not None:
            store.close()
        raise
    from workbench.api import Workbench

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        wb = Workbench(spec.model, spec.dtype, spec.device, store=store, freeze_gc=True)
        stream = None if args.json else (lambda event: print(event.text, end="", flush=True))
        trace = wb.generate(prompt, spec, on_event=stream)
    finally:
        if store is not None:
            store.close()
    summary = trace.summary()
    if args.json:
        out: dict[str, Any] = {
            "text": trace.text,
            "prompt_token_ids": trace.prompt_ids,
            "token_ids": trace.token_ids,
            **summary,  # every metric (workbench/metrics.py), the labels lossless / simulated / warm_start too
            "weight_bytes": trace.weight_bytes,
            "spec": trace.spec.to_string(),
            "spec_json": trace.spec.to_dict(),
            "run_id": trace.run_id,
            "model": trace.model,
            "dtype": trace.dtype,
            "device": trace.device,
        }
        print(json.dumps(out))
    else:
        print(f"\n\n[{summary['n_new_tokens']} tokens, {summary['tok_per_s']:.1f} tok/s, "
              f"ttft {summary['ttft_s'] * 1000:.0f} ms, {summary['target_forwards']} target forwards, "
              f"stopped: {summary['finish_reason']}]", file=sys.stderr)
        if summary["kv_loaded_tokens"]:
            print(kv_load_line(summary, args.kv_from or "the file", wb.model(spec).model.config), file=sys.stderr)
        if store is not None:
            print(f"[recorded as run {trace.run_id} in {store.path}]", file=sys.stderr)
    return 0


def kv_file_options(spec: RunSpec, args: argparse.Namespace) -> None:
    """--kv-from / --kv-save as the cachegen policy's load / save (on a cachegen the spec already names)."""
    settings = {k: v for k, v in (("load", args.kv_from), ("save", args.kv_save)) if v}
    if not settings:
        return
    existing = [t for t in spec.cache if t.name == "cachegen"]
    if existing:
        existing[0].params.update(settings)
    else:
        spec.cache.append(TechniqueSpec("cachegen", settings))
    spec.validated()


def kv_load_line(summary: dict[str, Any], path: str, config: Any) -> str:
    """The loaded cache against the prefill it replaced: file bytes, raw float16 bytes, load and prefill time."""
    n = summary["kv_loaded_tokens"]
    raw = n * config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2
    size = Path(path).stat().st_size
    return (f"[cache of {n} prompt tokens loaded from {path}: {size / 2**20:.2f} MiB, {100 * size / raw:.1f}% of "
            f"their float16 cache ({raw / 2**20:.2f} MiB), in {summary['kv_load_s'] * 1000:.0f} ms; the rest of the "
            f"prompt prefilled in {summary['prefill_s'] * 1000:.0f} ms]")


def cmd_list(args: argparse.Namespace) -> int:
    from workbench import registry

    techniques = registry.techniques(args.category)
    if args.json:
        print(json.dumps([t.to_dict() for t in techniques], indent=1))
        return 0
    if args.markdown:
        print(catalogue_markdown(techniques))
        return 0
    for category in registry.CATEGORIES if args.category is None else [args.category]:
        print(f"{category}:")
        in_category = [t for t in techniques if t.category == category]
        if not in_category:
            print("  (none registered yet)")
        for t in in_category:
            lossless = " [lossless]" if t.lossless else " [LOSSY]"
            print(f"  {t.name}{lossless}  {t.summary}")
            for p in t.params:
                print(f"      {p.describe()}  {p.help}")
    return 0


def catalogue_markdown(techniques: list) -> str:
    """docs/techniques.md: every registered technique and its parameters, from the registry."""
    lines = ["# Techniques", "", "Generated by `workbench list --markdown > docs/techniques.md`; "
             "a test fails when it is out of date.", ""]
    for category in dict.fromkeys(t.category for t in techniques):
        lines += [f"## {category}", ""]
        for t in (t for t in techniques if t.category == category):
            lossless = " (lossless)" if t.lossless else " (lossy)"
            lines += [f"### `{t.name}`{lossless}", "", t.summary, ""]
            if t.params:
                lines += ["| parameter | type | default | allowed | help |", "| --- | --- | --- | --- | --- |"]
                for p in t.params:
                    allowed = "/".join(map(str, p.choices)) if p.choices else (
                        "" if p.min is None and p.max is None else
                        f"[{'' if p.min is None else p.min}, {'' if p.max is None else p.max}]")
                    lines.append(f"| `{p.name}` | {p.type} | `{p.default!r}` | {allowed} | {p.help} |")
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def cmd_bench(args: argparse.Namespace) -> int:
    from workbench.bench import run_baseline_bench, run_decoding_bench
    from workbench.store.commands import open_recorder

    store = open_recorder(args)
    try:
        if args.roofline:
            from workbench.eval.roofline import run_roofline_bench

            return run_roofline_bench(args, store)
        return (run_decoding_bench if args.decode else run_baseline_bench)(args, store)
    finally:
        if store is not None:
            store.close()


def cmd_eval(args: argparse.Namespace) -> int:
    from workbench.eval.runner import run_command

    return run_command(args)


def cmd_app(args: argparse.Namespace) -> int:
    try:
        from workbench.apps.server import serve
    except ImportError as err:
        raise WorkbenchError(f"the app needs the `app` extra ({err.name} is missing): "
                             "pip install -e '.[app]' (make app does it)") from None
    serve(args.model, args.host, args.port, args.share, args.store, not args.no_store, args.dtype, args.device)
    return 0


def _add_search_command(sub: argparse._SubParsersAction) -> None:
    # defined here, not in workbench.compression.search: importing that loads torch, and the parser is built
    # for every command (a second store writer must be refused before torch loads)
    p = sub.add_parser("search", help="search a per-layer plan under a bit budget (HAWQ, EvoPress or FLIQS)",
                       description="Searches a level per decoder linear (bits 2, 3 or 4 at group 64 or 32) whose "
                       "stored bytes (codes, scales, offsets) are at most uniform --budget-bits at --group's, and "
                       "writes the plan, a RunSpec string, to -o; run it with --compress plan:FILE "
                       "(docs/compression.md).")
    p.add_argument("--budget-bits", type=float, required=True,
                   help="the plan's bytes are at most those of uniform --budget-bits at --group")
    p.add_argument("--method", choices=("evopress", "hawq", "fliqs"), default="evopress",  # search.METHODS
                   help="evopress, hawq (levels above), or fliqs (integer and float formats per linear, "
                   "compression/fliqs.py)")
    p.add_argument("--minutes", type=float, default=3.0, help="time budget (the search stops after it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group", type=int, default=64, help="inputs per scale/offset group of the uniform budget")
    p.add_argument("--quantizer", choices=("rtn", "gptq"), default="rtn",  # plan.QUANTIZERS
                   help="the levels' quantizer: round to nearest (int4) or GPTQ per layer (gptq)")
    p.add_argument("--curvature", choices=("fisher", "hessian"), default="fisher",  # hawq.CURVATURES
                   help="hawq's layer sensitivity: the trace of the Gauss-Newton (Fisher) matrix, or of the "
                   "loss Hessian (noisier: its estimates can fall below zero), each by Hutchinson's method")
    p.add_argument("--tokens", type=int, default=1024, help="calibration tokens (standard-library docstrings)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default="auto")
    p.add_argument("-o", "--output", required=True, help="file the plan is written to")
    p.add_argument("--json", help="also write the plan, its levels and the search's record to this JSON file")
    p.set_defaults(func=_cmd_search)


def _cmd_search(args: argparse.Namespace) -> int:
    from workbench.compression.search import cmd_search

    return cmd_search(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text from a prompt, streaming it")
    p.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    _add_run_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with the text and metrics")
    p.add_argument("--kv-from", metavar="FILE", help="load the KV cache of the prompt's leading tokens from a CacheGen "
                   "file (made with --kv-save) instead of prefilling them: adds cache=cachegen:load=FILE")
    p.add_argument("--kv-save", metavar="FILE", help="encode the prompt's KV cache into a CacheGen file after the "
                   "prefill: adds cache=cachegen:save=FILE")
    add_recording_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("list", help="list every technique and its parameters")
    p.add_argument("--category", choices=["decoding", "acceptance", "cache", "compression"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--markdown", action="store_true", help="the catalogue as in docs/techniques.md")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("bench", help="measure tok/s against peers on the same prompts", description=(
        "Without --decode: plain decoding against transformers' generate on a few prompts. With --decode: "
        "each technique over the prompt suite, against plain decoding in the same run. With --roofline: plain "
        "decoding per weight format against the machine's read bandwidth."))
    p.add_argument("--peers", default="transformers",
                   help="comma-separated peers: transformers (plain); with --decode also transformers-pld (its "
                   "prompt lookup), transformers-assisted (assisted generation, the target's first layers as "
                   "assistant), transformers-early-exit (self-speculation exiting after the first layers), llama-cpp "
                   "and llama-cpp-pld (llama.cpp on the same GGUF, plain on the prebuilt libraries `make setup` "
                   "fetches, or llama-cpp-python, which its prompt lookup needs); with --roofline only llama-cpp "
                   "(transformers, the default, is left out)")
    p.add_argument("--assistant-layers", type=int, default=8,
                   help="layers of the target that the transformers-assisted peer's assistant keeps, and where "
                   "the transformers-early-exit peer exits")
    p.add_argument("--decode", action="append", help="decoding technique to benchmark over the suite (repeatable)")
    p.add_argument("--compress", help="with --decode: a compression chain applied to every technique's model, "
                   "plain included (e.g. int4:group=32,head=true)")
    p.add_argument("--categories", help="comma-separated suite categories (default: all)")
    p.add_argument("--per-category", type=int, help="prompts per category (default: all 10)")
    p.add_argument("--plot", help="with --decode: save a speed-up-by-category bar chart here (PNG); with "
                   "--roofline: the roofline plot")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (peers run on the same device)")
    p.add_argument("--peer-dtypes", default="bfloat16,float32",
                   help="dtypes to run the peers in; the fastest is the one compared against")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=4, help="how many prompts of the built-in set")
    p.add_argument("--repeats", type=int, default=2, help="runs per prompt and engine (alternating)")
    p.add_argument("--roofline", action="store_true",
                   help="plain decoding in each --format against the read bandwidth measured in the same run: "
                   "tok/s, bytes read per token, achieved GB/s and its fraction (peers: llama-cpp)")
    p.add_argument("--format", action="append",
                   help="with --roofline: a weight format, bf16 or a compression chain (repeatable; default "
                   "bf16, int8 and int4:group=32,head=true, each also with act=int8)")
    p.add_argument("--bandwidth-bytes", type=int,
                   help="with --roofline: the main-memory bandwidth buffer's size (default twice the last-level cache)")
    p.add_argument("--json", help="also write the results to this JSON file")
    add_recording_options(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="quality of cache policies and weight transforms (perplexity, KL, retrieval); "
                       "with --lossy, speed against quality of every lossy decoding technique",
                       description="Perplexity, KL divergence and top-1 agreement against the full cache and "
                       "uncompressed weights, passkey and key-value retrieval, and the kvpress peer (docs/quality.md). "
                       "With --lossy: every lossy decoding technique against plain decoding and lossless drafters in "
                       "one run: speed-up, token agreement, departures, perplexity, code that parses and passes "
                       "hidden tests (docs/decoding.md).")
    from workbench.eval.runner import add_arguments as add_eval_arguments

    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("app", help="start the browser app (side-by-side generation, live views, runs, SQL)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also ask Gradio for a public share link (needs a network)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the model every configuration runs on (loaded once)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_recording_options(p)
    p.set_defaults(func=cmd_app)

    from workbench.training.command import add_train_command

    add_train_command(sub)
    from workbench.training.finetune_command import add_finetune_command

    add_finetune_command(sub)

    _add_search_command(sub)
    from workbench.sweep.command import add_sweep_command

    add_sweep_command(sub)
    add_store_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
