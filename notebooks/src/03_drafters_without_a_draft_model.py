# Lab 3 source (scripts/make_notebooks.py writes the notebooks from it).
# ruff: noqa: E402
# %% [markdown]
# # Lab 3: drafters without a draft model
#
# A separate draft model must be trained, loaded and run. Three drafters need none:
#
# * **Prompt lookup** (Saxena 2023; IAD, arXiv 2106.04970): when the output repeats the input (a summary, an
#   edit, an answer quoting a document), the tokens that followed the last n-gram's earlier occurrence are a
#   good guess. Free to draft; a chain.
# * **Token recycling** (arXiv 2408.08696): keep, for every token, the top candidates the target itself
#   scored after it in earlier steps (an adjacency matrix), and draft a **tree** from it by breadth-first
#   expansion. Also free to draft; one forward verifies many branches.
# * **Layer skipping** (SWIFT, arXiv 2410.06916; Draft & Verify, arXiv 2309.08168): the target drafts for
#   itself with some of its layers skipped. Costs forwards, but needs no extra weights.
#
# All three are lossless: the target verifies every draft. Which wins depends on the text.
# %%
import matplotlib.pyplot as plt

from workbench import Workbench
from workbench.eval.suite import suite
from workbench.labs import check_mean_accepted, check_ngram_lookup

wb = Workbench()
prompts = {p.category: p.prompt for p in suite(["summarization", "qa"], per_category=1)}
for category, prompt in prompts.items():
    print(f"{category}: {prompt[:120]!r}...")
# %% [markdown]
# ## Exercise 1: n-gram lookup
#
# Write `ngram_lookup(tokens, max_ngram, k)`: for `n` from `max_ngram` down to 1, take the last `n` tokens;
# find their **first** earlier occurrence (one that ends before the last token); if there is one, return the
# up to `k` tokens that followed it. If no `n` matches, return `[]`. The check compares it with the
# workbench's `prompt_lookup` drafter on random sequences.
# %%
def ngram_lookup(tokens, max_ngram, k):
    # BEGIN SOLUTION
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n):
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + k]
    return []
    # END SOLUTION


check_ngram_lookup(ngram_lookup)
# %% [markdown]
# ## Racing the drafters, by prompt category
#
# Greedy, 16 new tokens each. `mean_accepted_length` is tokens per target forward (1.0 for plain decoding);
# the speed-up is against plain decoding measured in the same run.
# %%
SPECS = {
    "plain": "decode=plain",
    "prompt_lookup": "decode=prompt_lookup",
    "token_recycling": "decode=token_recycling",
    "layer_skip": "decode=layer_skip:search=none,ratio=0.4",
}
traces, results = [], {}
for category, prompt in prompts.items():
    for name, spec in SPECS.items():
        trace = wb.generate(prompt, spec + ";max_new_tokens=16")
        traces.append(trace)
        results[category, name] = trace.summary()
for category in prompts:
    base = results[category, "plain"]["tok_per_s"]
    for name in SPECS:
        s = results[category, name]
        print(f"{category:>13} {name:>16}: {s['mean_accepted_length']:.2f} tokens/forward, "
              f"{s['tok_per_s']:5.1f} tok/s ({s['tok_per_s'] / base:.2f}x plain)")
# %%
fig, ax = plt.subplots(figsize=(6, 3))
width = 0.2
for i, name in enumerate(SPECS):
    ax.bar([c + i * width for c in range(len(prompts))],
           [results[category, name]["mean_accepted_length"] for category in prompts], width, label=name)
ax.set_xticks([c + 1.5 * width for c in range(len(prompts))], list(prompts))
ax.set_ylabel("tokens per target forward")
ax.legend(fontsize=8)
plt.show()
# %% [markdown]
# Prompt lookup shines where the answer copies the prompt (summaries, edits, RAG); on an open question it
# rarely finds a match and falls back to plain decoding at no cost. Token recycling's tree keeps accepting
# something on any text. Layer skipping pays for its drafts with forwards, so its tokens per forward must be
# high enough to cover them.
#
# ## Their trees
#
# Every step's verified tree is in the trace (`StepEvent.tree`: tokens, parent of each node, accepted or
# not). A chain has parents `-1, 0, 1, ...`; token recycling drafts a real tree:
# %%
tokenizer = wb.model(wb.spec()).tokenizer
recycled = next(t for t in traces if t.spec.decode.name == "token_recycling")
step = max((e for e in recycled.events if e.tree), key=lambda e: e.n_accepted)
tree = step.tree
print(f"step {step.step}: {len(tree.tokens)} nodes, {step.n_accepted} accepted")
for i, (token, parent, depth, ok) in enumerate(zip(tree.tokens, tree.parents, tree.depths, tree.accepted)):
    if depth <= 3:
        print("   " * depth + f"{'*' if ok else '-'} {tokenizer.decode([token])!r} (node {i}, parent {parent})")
# %% [markdown]
# ## Exercise 2: a metric from the events
#
# Write `mean_accepted(trace)`: generated tokens per target forward, from `trace.events` alone (each event is
# one target forward, the prefill included, and `event.tokens` are the tokens it committed). The check
# compares it with `workbench.metrics`.
# %%
def mean_accepted(trace):
    # BEGIN SOLUTION
    return sum(len(e.tokens) for e in trace.events) / len(trace.events)
    # END SOLUTION


check_mean_accepted(mean_accepted, traces)
# %% [markdown]
# **Questions.** (1) Why does prompt lookup's acceptance rise after a few tokens of a summary? (2) Token
# recycling's tree has many nodes; what does verifying a 40-node tree cost compared with a 7-token chain
# (lab 1's measurement)? (3) `workbench bench --decode prompt_lookup --decode token_recycling` runs the whole
# prompt suite; which categories does each win?
