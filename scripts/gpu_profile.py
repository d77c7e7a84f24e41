"""Where a plain decode step's time goes, the workbench beside transformers' `generate`, on any device.

A host-bound engine is slowed by kernel launches, host-device copies and synchronizations (docs/performance.md,
"GPU"), so this counts them per generated token, and splits the engine's step into its forward
(`verify`) and what follows it (`accept`: sampling, trace, cache statistics).

Then it times plain greedy decoding of the same prompt, interleaved in rounds in this one process: the
workbench with its static step as CUDA graphs (graphs=on), through torch.compile's reduce-overhead mode
(graphs=compile, CUDA only) and eager (graphs=off), and transformers' `generate`; wall time of each whole call
(prefill included, every token to the host), median over the rounds, and each one's ratio to transformers (the
issue's bar: >= 2x). On a CPU graphs=on runs the static step eagerly.

    python scripts/gpu_profile.py --model PATH.gguf --device cuda --json decode_gpu.json   # gpu_check.sh bench
    python scripts/gpu_profile.py                                      # the embedded model on this CPU
"""

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from workbench import Workbench
from workbench.bench import transformers_peer

PROMPT = "Write a short story about a robot who learns to paint, in five sentences."
WATCHED = ("cudaLaunchKernel", "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaDeviceSynchronize",
           "aten::item", "aten::_local_scalar_dense", "aten::copy_", "aten::to")


def report(name: str, prof, tokens: int, top: int) -> None:
    events = prof.key_averages()
    print(f"\n== {name}: per generated token ({tokens} tokens)")
    for key in WATCHED:
        count = sum(e.count for e in events if e.key == key)
        if count:
            print(f"  {key:<28}{count / tokens:8.1f}")
    print(f"  {'op':<44}{'calls/token':>12}{'self CPU us/token':>19}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"  {e.key[:43]:<44}{e.count / tokens:12.1f}{e.self_cpu_time_total / tokens:19.1f}")


def decode_speed(wb: Workbench, spec, peer, ids: torch.Tensor, tokens: int, rounds: int) -> dict:
    """tok/s of each way of decoding (median over `rounds` interleaved rounds) and its ratio to transformers'."""
    cuda = ids.device.type == "cuda"
    modes = ("on", "compile", "off") if cuda else ("on", "off")
    options = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
                   min_new_tokens=tokens)

    def timed(fn, *args, **kwargs):
        """fn's result and tokens per second of wall time."""
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        return out, tokens / (time.perf_counter() - start)

    runs: dict[str, list[float]] = {f"workbench graphs={mode}": [] for mode in modes}
    runs["transformers generate"] = []
    reports = {}
    for _ in range(rounds + 1):  # the first round warms up (captures, compiles) and is not counted
        for mode in modes:
            reports[mode], speed = timed(wb.generate, PROMPT, wb.spec(spec, graphs=mode))
            runs[f"workbench graphs={mode}"].append(speed)
        with torch.inference_mode():
            runs["transformers generate"].append(timed(peer.generate, ids, **options)[1])
    medians = {name: statistics.median(values[1:]) for name, values in runs.items()}
    peer_speed = medians["transformers generate"]
    print(f"\n== plain greedy decoding, {tokens} tokens, median of {rounds} interleaved rounds")
    for name, speed in medians.items():
        print(f"  {name:<28}{speed:9.1f} tok/s  {speed / peer_speed:6.2f}x transformers")
    return {"tokens": tokens, "rounds": rounds, "tok_per_s": medians,
            "vs_transformers": {name: round(speed / peer_speed, 3) for name, speed in medians.items()},
            "graphs": {mode: trace.summary()["provenance"].get("graphs") for mode, trace in reports.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the decoding comparison")
    parser.add_argument("--json", help="write the decoding comparison here")
    args = parser.parse_args()
    wb = Workbench(args.model, "bfloat16", args.device)
    spec = wb.spec("decode=plain;ignore_eos=true", max_new_tokens=args.tokens)
    wb.generate(PROMPT, spec)  # warm-up
    trace = wb.generate(PROMPT, spec)
    steps = trace.events[1:]
    ms = {part: statistics.median(getattr(e, f"{part}_ns") for e in steps) / 1e6
          for part in ("draft", "verify", "accept")}
    print("workbench plain, median ms per step: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
          + f"; {trace.summary()['tok_per_s']:.1f} tok/s")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        wb.generate(PROMPT, spec)
    report("workbench", prof, args.tokens, args.top)

    loaded = wb.model(spec)
    peer = transformers_peer(loaded, loaded.dtype)
    ids = torch.tensor([wb.prompt_ids(loaded, PROMPT, None)], device=peer.device)
    options = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.tokens,
                   min_new_tokens=args.tokens)
    with torch.inference_mode():
        peer.generate(ids, **options)  # warm-up
        with profile(activities=activities) as prof:
            peer.generate(ids, **options)
    report("transformers generate", prof, args.tokens, args.top)
    result = decode_speed(wb, spec, peer, ids, args.tokens, args.rounds)
    if args.json:
        result["device"] = torch.cuda.get_device_name() if ids.device.type == "cuda" else "cpu"
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
