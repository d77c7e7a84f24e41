# Lab 1 source (scripts/make_notebooks.py writes the notebooks from it).
# ruff: noqa: E402
# %% [markdown]
# # Lab 1: the decoding loop
#
# A language model is a function from a sequence of tokens to one vector of **logits** per position: row `i`
# scores every token of the vocabulary as the next one after token `i`. Generating text is a loop around it:
# run the model, turn the last row into a choice, append the token, repeat. This lab builds that loop by hand
# on the embedded SmolLM2-135M model, then makes it fast with a **KV cache**, then measures what one forward
# costs, which is the fact speculative decoding (lab 2) is built on.
#
# Everything runs on a laptop CPU in under a minute. Exercises are marked **Exercise**; each ends with a
# `check_...` call that says what is wrong in plain words. `notebooks/solutions/` has this notebook solved.
# %%
import time

import matplotlib.pyplot as plt
import torch

from workbench import Workbench
from workbench.engine import build_cache
from workbench.labs import check_greedy, check_greedy_cached, check_processed_probs

torch.manual_seed(0)
wb = Workbench()  # the embedded SmolLM2-135M (bfloat16 on CPU)
loaded = wb.model(wb.spec())
model, tokenizer = loaded.model, loaded.tokenizer
prompt_ids = tokenizer("The capital of France is")["input_ids"]
print(f"{model.config.num_layers} layers, vocabulary {model.config.vocab_size}, prompt = {len(prompt_ids)} tokens")
# %% [markdown]
# ## Logits
#
# `model(tokens, positions)` runs every token at once and returns `logits` of shape `[tokens, vocab]`. The
# last row is the model's guess for what comes after the prompt. Softmax turns it into probabilities.
# %%
with torch.inference_mode():
    out = model(torch.tensor(prompt_ids), torch.arange(len(prompt_ids)))
print("logits:", tuple(out.logits.shape))
probs = torch.softmax(out.logits[-1].float(), -1)
top = probs.topk(5)
for p, t in zip(top.values, top.indices):
    print(f"{tokenizer.decode([int(t)])!r:>12}  {float(p):.3f}")
# %% [markdown]
# ## Exercise 1: greedy decoding, the slow way
#
# Write `greedy_decode(model, prompt_ids, n)`: `n` times, run the model over **the whole sequence so far**,
# take the argmax of the last row, append it. Return the `n` new tokens as Python ints. (Wrap the loop in
# `torch.inference_mode()`: no gradients are needed.)
# %%
def greedy_decode(model, prompt_ids, n):
    # BEGIN SOLUTION
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor(ids), torch.arange(len(ids))).logits
            ids.append(int(logits[-1].argmax()))
    return ids[len(prompt_ids):]
    # END SOLUTION


check_greedy(greedy_decode, model, prompt_ids, n=4)
# %% [markdown]
# ## Exercise 2: the KV cache
#
# Each step above recomputes every earlier token, although their keys and values never change. A **KV cache**
# keeps each layer's keys and values: the first forward (the *prefill*) runs the prompt and fills it; every
# later forward runs only the newest token at its position, attending over the cache. The workbench's cache:
#
# ```python
# cache = build_cache(model, [], capacity)       # [] = no cache policy: plain dense storage
# out = model(tokens, positions, cache)          # appends these tokens' keys and values
# cache.commit()                                 # keep them (speculative decoding will drop some instead)
# ```
#
# Write `greedy_decode_cached`: the same tokens, but one prefill and then one token per forward. The check
# counts the tokens each forward runs.
# %%
def greedy_decode_cached(model, prompt_ids, n):
    # BEGIN SOLUTION
    cache = build_cache(model, [], len(prompt_ids) + n + 8)
    out, ids = [], list(prompt_ids)
    tokens, positions = torch.tensor(ids), torch.arange(len(ids))
    with torch.inference_mode():
        for _ in range(n):
            logits = model(tokens, positions, cache).logits
            cache.commit()
            out.append(int(logits[-1].argmax()))
            tokens, positions = torch.tensor([out[-1]]), torch.tensor([len(ids) + len(out) - 1])
    return out
    # END SOLUTION


check_greedy_cached(greedy_decode_cached, model, prompt_ids, n=8)
# %% [markdown]
# The workbench's engine runs this same loop (`workbench/engine.py`), with a drafter, an acceptor and cache
# policies plugged in. Its answer for the same prompt (no chat template, greedy) is the same text:
# %%
trace = wb.generate("The capital of France is", "max_new_tokens=8;chat=false")
print(repr(trace.text))
print({k: round(v, 3) for k, v in trace.summary().items() if k in ("ttft_s", "tok_per_s", "target_forwards")})
# %% [markdown]
# ## Exercise 3: sampling
#
# Greedy decoding always takes the argmax. Sampling draws from a *processed* distribution instead: divide the
# logits by the **temperature** (below 1 sharpens, above 1 flattens), keep only the **top_k** largest
# (0 = all), then keep the smallest set of most likely tokens whose probability reaches **top_p**, and
# renormalise. Write `processed_probs(logits, temperature, top_k, top_p)`; the check compares it with
# `workbench.sampling.Sampler.probs`.
# %%
def processed_probs(logits, temperature, top_k, top_p):
    # BEGIN SOLUTION
    z = logits.float() / temperature
    if top_k:
        z = z.masked_fill(z < z.topk(top_k).values[-1], float("-inf"))
    if top_p < 1:
        p_sorted, order = torch.softmax(z, -1).sort(descending=True)
        before = p_sorted.cumsum(-1) - p_sorted  # probability of the tokens ranked above each one
        drop = torch.zeros_like(z, dtype=torch.bool)
        drop[order] = before >= top_p
        z = z.masked_fill(drop, float("-inf"))
    return torch.softmax(z, -1)
    # END SOLUTION


check_processed_probs(processed_probs)
# %% [markdown]
# With a seed, sampling is reproducible; a higher temperature gives more varied text:
# %%
for temperature in (0.3, 1.2):
    t = wb.generate("Once upon a time", f"max_new_tokens=8;chat=false;temperature={temperature};seed=1")
    print(f"T={temperature}: {t.text!r}")
# %% [markdown]
# ## What a forward costs
#
# With the cache, one decoding step runs one token through every layer: ~2 x 135M multiply-adds, but also a
# read of **every weight** (270 MB in bfloat16). On a CPU the read dominates: the step is memory-bound. So
# running a few more tokens in the same forward costs little more than one. Measure it: the time of a
# forward over T new tokens after a cached prompt.
# %%
cache = build_cache(model, [], 64)
with torch.inference_mode():
    model(torch.tensor(prompt_ids), torch.arange(len(prompt_ids)), cache)
    cache.commit()


def forward_ms(t, repeats=3):
    """Best of `repeats`: the machine may be busy with other work."""
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            model(torch.arange(t) + 100, torch.arange(t) + len(prompt_ids), cache)
            best = min(best, time.perf_counter() - start)
            cache.rollback()  # drop the uncommitted tokens: the cache holds the prompt again
    return 1000 * best


forward_ms(1)  # a first forward pays one-off costs (memory allocation); not measured
sizes = [1, 4, 8, 16]
costs = [forward_ms(t) for t in sizes]
for t, c in zip(sizes, costs):
    print(f"{t:3d} tokens: {c:6.1f} ms  ({c / costs[0]:.2f} x one token)")
plt.figure(figsize=(5, 3))
plt.plot(sizes, costs, "o-")
plt.xlabel("tokens in one forward")
plt.ylabel("ms (best of 3)")
plt.ylim(bottom=0)
plt.title("one forward's cost grows slowly with its tokens")
plt.show()
# %% [markdown]
# If 8 tokens cost much less than 8 forwards of one, then *guessing* the next few tokens cheaply and checking
# all the guesses in one forward pays off whenever enough guesses are right. That is speculative decoding:
# lab 2.
#
# **Questions.** (1) Why does the prefill of a long prompt cost more per forward than a decoding step, but
# less per token? (2) What does the KV cache cost in memory for a 2,048-token context here
# (`model.config`: layers x kv heads x head_dim x 2 (K and V) x 2 bytes)? Lab 4 shrinks it.
