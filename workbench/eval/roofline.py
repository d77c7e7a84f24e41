"""`workbench bench --roofline`: plain decoding in each weight format against the machine's read bandwidth.

A one-token decoding step must read every weight once (the LM head over a tied embedding too) and the KV
cache up to its context; nothing else it does needs memory traffic of that size. So tok/s x bytes per token is
the read rate decoding achieves, and the read bandwidth measured in the same process (workbench/eval/
bandwidth.py) is its ceiling, the roofline. Per format the command reports tok/s over the decode steps
(prefill and the first token excluded), bytes read per token (the model's own tensors as the step reads
them, plus the mean KV cache read), achieved GB/s, its fraction of the measured bandwidth, and the time per
token that is not reading weights at that bandwidth. The bandwidth is the C kernels' read (the ceiling: it
streams at least as fast as the products), with torch.sum's rate over the same buffers as a second figure.
llama.cpp on the same GGUF (`--peers llama-cpp`) is measured the same way, its bytes being the GGUF's tensors.

Bandwidth reads and decoding runs are interleaved (one read of each buffer before every round of prompts, the
engines' order alternating), so a neighbour's load moves both alike and the fraction stays meaningful.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from workbench.compression.base import CompressedLinear
from workbench.compression.int8 import Int8Linear
from workbench.errors import WorkbenchError
from workbench.eval.bandwidth import ReadBuffer, default_method, main_memory_buffer_bytes
from workbench.eval.llama_cpp_peer import llama_cpp_peer
from workbench.eval.prompts import BASELINE_PROMPTS
from workbench.kernels import dispatch
from workbench.models.config import ModelConfig
from workbench.models.embedded import EMBEDDED_ALIASES, embedded_gguf_path
from workbench.models.llama import LlamaModel
from workbench.models.packed_linear import PackedLinear
from workbench.provenance import provenance

# int4 group 32: the GGUF's own grid (compression.md); act=int8: integer dot products as llama.cpp multiplies
DEFAULT_FORMATS = ("bf16", "int8", "int8:act=int8", "int4:group=32,head=true", "int4:group=32,head=true,act=int8")
ROOFLINE_PEERS = ("llama-cpp",)


def linear_read_bytes(module: nn.Module) -> int:
    """Bytes a one-row product through `module` reads: its weight as stored for the kernel, and its bias."""
    bias = 0 if module.bias is None else module.bias.numel() * module.bias.element_size()
    if isinstance(module, PackedLinear):
        return module.packed_nbytes() + bias
    if isinstance(module, Int8Linear) and module.scales_f32 is not None:  # the C kernel reads float32 scales only
        return module.codes.numel() + module.scales_f32.numel() * 4 + bias
    if isinstance(module, CompressedLinear):
        return module.weight_nbytes() + bias
    return module.weight.numel() * module.weight.element_size() + bias


def weight_read_bytes(model: LlamaModel) -> dict[str, int]:
    """Bytes one decoding step reads from the weights, by part: the layers' products, the LM head (once, also
    when tied: the embedding lookup then reads a single row of it), the norms, and one embedding row."""
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear, CompressedLinear))]
    head = model.lm_head
    norms = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if name.endswith("norm"))
    return {
        "layers": sum(linear_read_bytes(m) for m in linears if m is not head),
        "lm_head": linear_read_bytes(head),
        "norms": norms,
        "embedding_row": model.config.hidden_size * model.dtype.itemsize,
    }


def kv_read_bytes(config: ModelConfig, element_size: int, context: float) -> float:
    """Bytes of keys and values a step's attention reads over `context` cached tokens, every layer."""
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * element_size * context


def mean_decode_context(prompt_tokens: list[int], new_tokens: int) -> float:
    """Mean keys attended per decode step: the step feeding generated token j (1..n-1) sees prompt + j keys."""
    steps = [p + j for p in prompt_tokens for j in range(1, new_tokens)]
    return sum(steps) / len(steps) if steps else 0.0


def gguf_read_bytes(path: Path) -> int:
    """Bytes of a GGUF file's tensors that llama.cpp reads per step: all of them, the token embedding only where
    it is also the output layer (tied); the embedding lookup's one row is not counted."""
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    untied_embedding = sizes["token_embd.weight"] if "output.weight" in sizes else 0
    return sum(sizes.values()) - untied_embedding


def _format_spec(name: str) -> str | None:
    return None if name in ("bf16", "none", "") else f"compress={name}"


def run_roofline_bench(args: argparse.Namespace, store=None) -> int:
    from workbench.api import Workbench, hardware_description

    if args.decode or args.compress:
        raise WorkbenchError("--roofline measures plain decoding in each --format; it takes no --decode or "
                             "--compress (give a compression chain as --format)")
    formats = list(dict.fromkeys(args.format or DEFAULT_FORMATS))
    peers = [p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "transformers"]
    unknown = set(peers) - set(ROOFLINE_PEERS)
    if unknown:
        raise WorkbenchError(f"--roofline takes peers {', '.join(ROOFLINE_PEERS)}; not {', '.join(sorted(unknown))}")
    if not 1 <= args.prompts <= len(BASELINE_PROMPTS):
        raise WorkbenchError(f"--prompts must be between 1 and {len(BASELINE_PROMPTS)}")
    if args.max_new_tokens < 2:
        raise WorkbenchError("--max-new-tokens must be at least 2: decoding speed is measured after the first token")
    wb = Workbench(args.model, args.dtype, args.device, store=store, freeze_gc=True)
    specs = {f: wb.spec(_format_spec(f), max_new_tokens=args.max_new_tokens, ignore_eos=True) for f in formats}
    loaded = {f: wb.model(s) for f, s in specs.items()}
    first = loaded[formats[0]]
    if first.device.type != "cpu":
        raise WorkbenchError("--roofline measures the CPU's memory bandwidth; run it with --device cpu")
    texts = (BASELINE_PROMPTS[: args.prompts] if first.tokenizer is not None  # tiny random models take ids
             else [" ".join(str(3 + (7 * i + j) % 97) for j in range(24)) for i in range(args.prompts)])
    prompt_ids = [wb.prompt_ids(first, t, None) for t in texts]

    engines: dict[str, Any] = {f: (lambda i, n, f=f: _workbench_decode(wb, texts[i], specs[f], n)) for f in formats}
    read_bytes: dict[str, dict[str, float]] = {f: dict(weight_read_bytes(m.model)) for f, m in loaded.items()}
    context = mean_decode_context([len(p) for p in prompt_ids], args.max_new_tokens)
    for f, m in loaded.items():
        read_bytes[f]["kv_cache"] = kv_read_bytes(m.config, m.dtype.itemsize, context)
    if "llama-cpp" in peers:
        gguf = embedded_gguf_path() if first.name.lower() in EMBEDDED_ALIASES else Path(first.source)
        run = llama_cpp_peer(gguf, prompt_lookup=False, decode_only=True)
        label = f"llama.cpp {gguf.stem.rsplit('.', 1)[-1]}"
        engines[label] = lambda i, n, run=run: run(prompt_ids[i], n)[:2]
        read_bytes[label] = {"gguf_tensors": gguf_read_bytes(gguf),  # llama.cpp's cache is float16: 2 bytes
                             "kv_cache": kv_read_bytes(first.config, 2, context)}
    totals = {name: sum(parts.values()) for name, parts in read_bytes.items()}

    memory = ReadBuffer(args.bandwidth_bytes or main_memory_buffer_bytes())
    same_size = {name: ReadBuffer(int(b)) for name, b in totals.items()}  # the step's bytes, read again and again
    buffers = {"main_memory": memory, **same_size}
    method = default_method()
    bandwidth = {name: b.measure(1, method) for name, b in buffers.items()}
    second = {name: b.measure(1, "torch.sum") for name, b in buffers.items()} if method != "torch.sum" else {}
    for engine in engines.values():  # warm-up: first calls pay for allocation and thread start-up
        engine(0, 8)
    counts = {name: [0, 0.0] for name in engines}
    with dispatch.recording() as used:
        bar = tqdm(total=args.repeats * len(prompt_ids) * len(engines), desc="roofline", unit="run")
        for r in range(args.repeats):
            for i in range(len(prompt_ids)):
                for name, buffer in buffers.items():
                    bandwidth[name].add(buffer.measure(1, method))
                    if second:
                        second[name].add(buffer.measure(1, "torch.sum"))
                for name in (list(engines) if (r + i) % 2 == 0 else list(reversed(engines))):
                    tokens, seconds = engines[name](i, args.max_new_tokens)
                    counts[name][0] += tokens
                    counts[name][1] += seconds
                    bar.update(1)
        bar.close()

    peak = bandwidth["main_memory"].median
    rows = []
    for name, (tokens, seconds) in counts.items():
        tok_s = tokens / seconds
        size_bw = bandwidth[name].median
        rows.append({
            "engine": name, "tok_per_s": tok_s, "bytes_per_token": totals[name], "read_bytes": read_bytes[name],
            "achieved_gb_s": totals[name] * tok_s / 1e9, "fraction_of_bandwidth": totals[name] * tok_s / 1e9 / peak,
            "same_size_gb_s": size_bw, "fraction_of_same_size": totals[name] * tok_s / 1e9 / size_bw,
            "same_size_torch_sum_gb_s": second[name].median if second else size_bw,
            "ms_per_token": 1e3 / tok_s, "roofline_ms_per_token": totals[name] / peak / 1e6,
            "ms_not_reading": 1e3 / tok_s - totals[name] / peak / 1e6,
            "ratio_to_first": tok_s / (counts[formats[0]][0] / counts[formats[0]][1]),
        })
    result = {
        "model": first.name, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens, "prompts": len(prompt_ids),
        "prompt_tokens": [len(p) for p in prompt_ids], "mean_context": context, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "machine": hardware_description(first.device),
        "provenance": provenance(first.model, first.device, first.dtype, used),
        "bandwidth_method": ("the C kernels' AVX-512 read (workbench_read_f32)" if method == "kernel" else
                             "torch.sum") + " over a float32 buffer on all threads, median of interleaved reads "
                                            "(workbench/eval/bandwidth.py)",
        "bandwidth": {name: b.as_dict() for name, b in bandwidth.items()},
        "bandwidth_torch_sum": {name: b.as_dict() for name, b in second.items()},
        "rows": rows,
    }
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.plot:
        plot_roofline(result, args.plot)
    return 0


def _workbench_decode(wb, prompt: str, spec, n: int) -> tuple[int, float]:
    """(decode tokens, their seconds): the run's tokens after the first, over the time after the first."""
    summary = wb.generate(prompt, spec, max_new_tokens=n).summary()
    return summary["n_new_tokens"] - 1, summary["total_s"] - summary["ttft_s"]


def _print(result: dict[str, Any]) -> None:
    b = result["bandwidth"]["main_memory"]
    print(f"\nread bandwidth by {b['method']} (main memory, {b['buffer_bytes'] / 2**20:.0f} MiB buffer): median "
          f"{b['median_gb_s']:.1f} GB/s over {len(b['samples'])} reads ({b['low_gb_s']:.1f}-{b['high_gb_s']:.1f})")
    if result["bandwidth_torch_sum"]:
        t = result["bandwidth_torch_sum"]["main_memory"]
        print(f"torch.sum over the same buffer: median {t['median_gb_s']:.1f} GB/s")
    w = max(len(r["engine"]) for r in result["rows"]) + 2
    print(f"{'engine':<{w}}{'tok/s':>8}{'MB/token':>10}{'GB/s':>7}{'of bw':>7}{'of same-size':>13}{'torch.sum':>10}"
          f"{'ms/token':>10}{'roofline ms':>12}{'not reading':>12}")
    for r in result["rows"]:
        print(f"{r['engine']:<{w}}{r['tok_per_s']:>8.1f}{r['bytes_per_token'] / 1e6:>10.1f}{r['achieved_gb_s']:>7.1f}"
              f"{r['fraction_of_bandwidth']:>7.0%}{r['fraction_of_same_size']:>13.0%}"
              f"{r['same_size_torch_sum_gb_s']:>10.1f}{r['ms_per_token']:>10.2f}"
              f"{r['roofline_ms_per_token']:>12.2f}{r['ms_not_reading']:>12.2f}")


def plot_roofline(result: dict[str, Any], path: str) -> None:
    """Bytes per token against tok/s, each engine a point, with the measured bandwidth's line
    (tok/s = bandwidth / bytes) and its spread as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    band = result["bandwidth"]["main_memory"]
    sizes = [r["bytes_per_token"] / 1e6 for r in rows]
    x = torch.linspace(0.6 * min(sizes), 1.4 * max(sizes), 100).tolist()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, [band["median_gb_s"] * 1e3 / s for s in x], color="black",
            label=f"read bandwidth, median {band['median_gb_s']:.1f} GB/s")
    ax.fill_between(x, [band["low_gb_s"] * 1e3 / s for s in x], [band["high_gb_s"] * 1e3 / s for s in x],
                    color="grey", alpha=0.25, label="its spread over the run")
    for r, size in zip(rows, sizes):
        ax.scatter([size], [r["tok_per_s"]], s=40, zorder=3)
        label = f"{r['engine']}\n{r['tok_per_s']:.0f} tok/s, {r['fraction_of_bandwidth']:.0%}"
        ax.annotate(label, (size, r["tok_per_s"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("MB read per token (weights + KV cache)")
    ax.set_ylabel("decoding tok/s")
    ax.set_title(f"{result['model']}, plain decoding, {result['threads']} threads")
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

