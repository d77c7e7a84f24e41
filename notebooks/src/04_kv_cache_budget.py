# Lab 4 source (scripts/make_notebooks.py writes the notebooks from it).
# ruff: noqa: E402
# %% [markdown]
# # Lab 4: the KV cache under a budget
#
# The KV cache grows by `layers x kv_heads x head_dim x 2 (K and V) x bytes` per token: for SmolLM2-135M in
# bfloat16, 30 x 3 x 64 x 2 x 2 = 23 KB a token, 47 MB for 2,048 tokens; for an 8B model, 128 KB a token.
# Two ways to shrink it:
#
# * **Quantize** what is kept. KIVI (arXiv 2402.02750) stores keys in 2 or 4 bits **per channel** (key
#   channels have outliers that span the whole sequence) and values **per token**, with a recent window kept
#   in full precision.
# * **Evict** tokens. StreamingLLM (arXiv 2309.17453) keeps the first few tokens (attention sinks) and a
#   recent window; H2O (arXiv 2306.14048) keeps the tokens that received the most attention so far; SnapKV
#   (arXiv 2404.14469) lets the prompt's last queries vote for what each head keeps.
#
# This lab measures what each costs in quality (perplexity, retrieval) for what it saves in **real bytes**
# (the tensors the cache holds, not a formula), and looks at which tokens an evicting cache keeps.
# %%
import matplotlib.pyplot as plt
import torch

from workbench import Workbench
from workbench.engine import build_cache
from workbench.eval.quality import compare, evaluation_windows, teacher_forced
from workbench.eval.retrieval import is_correct, probe
from workbench.labs import check_quantize_keys, check_streaming_mask
from workbench.spec import RunSpec

wb = Workbench()
loaded = wb.model(wb.spec())
model = loaded.model
# %% [markdown]
# ## Exercise 1: KIVI's keys
#
# Write `quantize_keys(k, bits)` for one group of keys `k` `[tokens, channels]`: per channel, the minimum and
# the scale `(max - min) / (2^bits - 1)` over the group's tokens (shape `[1, channels]`), and codes
# `round((k - min) / scale)` in `0 .. 2^bits - 1`. Return `(codes, scale, minimum)`; `codes * scale + minimum`
# rebuilds k.
# %%
def quantize_keys(k, bits):
    # BEGIN SOLUTION
    mn = k.amin(0, keepdim=True)
    scale = ((k.amax(0, keepdim=True) - mn) / (2**bits - 1)).clamp_min(1e-6)
    codes = ((k - mn) / scale).round().clamp(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, mn
    # END SOLUTION


check_quantize_keys(quantize_keys)
# %% [markdown]
# Why per channel? Real keys from the model: a few channels are far larger than the rest, on every token.
# A per-token scale would be set by those outliers and crush the other channels to one or two codes.
# %%
ids = torch.tensor(evaluation_windows(loaded, 64, 1)[0])
cache = build_cache(model, [], 64)
with torch.inference_mode():
    model(ids, torch.arange(len(ids)), cache)
    cache.commit()
keys, _ = cache[10].view()  # [kv heads, tokens, head_dim], as cached (after RoPE)
plt.figure(figsize=(6, 2.5))
plt.imshow(keys[0].float().abs().T, aspect="auto", cmap="magma")
plt.xlabel("token")
plt.ylabel("key channel (head 0)")
plt.title("|key| at layer 10: outlier channels run across all tokens")
plt.colorbar()
plt.show()
# %% [markdown]
# ## Exercise 2: StreamingLLM's kept-token mask
#
# Write `streaming_mask(context, sinks, window)`: a bool tensor over the `context` positions, True for the
# tokens StreamingLLM keeps (the first `sinks`, the last `window`).
# %%
def streaming_mask(context, sinks, window):
    # BEGIN SOLUTION
    keep = torch.zeros(context, dtype=torch.bool)
    keep[:sinks] = True
    if window:
        keep[-window:] = True
    return keep
    # END SOLUTION


check_streaming_mask(streaming_mask)
# %% [markdown]
# ## Bytes against perplexity
#
# `teacher_forced` is the protocol of `workbench eval` (docs/quality.md): the engine's own loop prefills a
# window of the evaluation text, then is fed the true next token one step at a time, so each policy's
# evictions and quantization act exactly as in generation. 176 tokens of prefill, 16 scored; the cache's live
# bytes are measured after the last step.
# %%
POLICIES = ["", "kivi:bits=4,group=32,residual=16", "kivi:bits=2,group=32,residual=16",
            "streaming:sinks=4,window=44", "h2o:budget=48", "snapkv:budget=48,window=16"]
window = evaluation_windows(loaded, 192, 1)
runs = {}
for name in POLICIES:
    policies = [t.build("cache") for t in RunSpec.parse(f"cache={name}").cache] if name else []
    runs[name or "dense"] = [teacher_forced(model, policies, ids, 176, loaded.tokenizer) for ids in window]
reference = runs["dense"]
rows = []
for name, forced in runs.items():
    q = compare(reference, forced)
    rows.append((name, forced[0].cache_bytes_end, q["perplexity"], q["kl"]))
    print(f"{name:>34}: {forced[0].cache_bytes_end / 1024:7.1f} KiB  perplexity {q['perplexity']:6.2f}  "
          f"KL {q['kl']:.4f}")
# %%
plt.figure(figsize=(6, 3.5))
for name, nbytes, ppl, _ in rows:
    plt.scatter(nbytes / 1024, ppl)
    plt.annotate(name.split(",")[0], (nbytes / 1024, ppl), fontsize=8)
plt.xlabel("KV cache live bytes after the window (KiB)")
plt.ylabel("perplexity on the 16 scored tokens")
plt.show()
# %% [markdown]
# ## Retrieval: what eviction forgets
#
# Perplexity averages over easy tokens. A passkey hidden in filler text shows what eviction loses: the
# answer needs one token from far back. (A 135M model finds the key in a short prompt with its full cache.)
# %%
count = lambda text: len(loaded.tokenizer(text)["input_ids"])  # noqa: E731
needle = probe("passkey", 160, 0.3, 0, count)
for name in ["", "streaming:sinks=4,window=44", "snapkv:budget=48,window=16"]:
    trace = wb.generate(needle.prompt, f"cache={name};max_new_tokens=8;chat=false" if name
                        else "max_new_tokens=8;chat=false")
    print(f"{name or 'dense':>28}: {trace.text.strip()!r:30} right: {is_correct(trace.text, needle.expected)}")
# %% [markdown]
# ## The kept-token mask
#
# An evicting cache's statistics record which positions each layer and head still holds (`StepEvent.
# cache_stats.kept`, sampled on the prefill and the last step). H2O keeps different tokens per head:
# %%
trace = wb.generate(needle.prompt, "cache=h2o:budget=48;max_new_tokens=4;chat=false")
stats = trace.events[-1].cache_stats
context = len(trace.prompt_ids) + trace.summary()["n_new_tokens"]
layer = 10
mask = torch.zeros(len(stats.kept[layer]), context)
for head, kept in enumerate(stats.kept[layer]):
    mask[head, kept] = 1
plt.figure(figsize=(7, 1.8))
plt.imshow(mask, aspect="auto", cmap="Greys", interpolation="nearest")
plt.xlabel("position in the context")
plt.ylabel("kv head")
plt.title(f"H2O, budget 48: tokens held at layer {layer} (black)")
plt.show()
# %% [markdown]
# **Questions.** (1) Which policy loses least per byte saved on these 16 tokens, and why can 16 scored tokens
# rank them differently from the retrieval probe? What does eviction lose that quantization keeps? (2) Why
# does KIVI keep a full-precision recent window? (3) Rerun
# with `workbench eval --cache kivi:bits=2 --cache snapkv --budgets 0.25,0.5` for the full figures.
