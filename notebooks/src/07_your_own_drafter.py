# Lab 7 source (scripts/make_notebooks.py writes the notebooks from it).
# ruff: noqa: E402
# %% [markdown]
# # Lab 7 (exercise lab): write your own drafter
#
# A drafter is one class: each step, `propose(state)` returns a `DraftTree` of guessed tokens; the engine
# runs the target over them, the acceptor keeps the right prefix, and `observe` tells the drafter what
# happened. Registered under a name, it works everywhere a built-in one does: `wb.generate`, `workbench
# bench`, the app, the store.
#
# Your drafter: a **bigram table**. For each token, remember which token followed it most recently (in the
# prompt and in the output so far); draft a chain by following the table from the pending token, up to `k`
# tokens, stopping at a token the table has not seen or at a loop back to a token already in the chain. It
# learns from its own output, needs no model, and drafts in microseconds.
#
# You will (1) fill in the class, (2) check it is **lossless** with the project's own harness
# (`workbench.testing`, the one `tests/test_distribution.py` runs on every built-in drafter), and (3) race it
# against prompt lookup.
# %%
from dataclasses import dataclass, field

from workbench import Workbench
from workbench.decoding.base import Drafter, DraftTree
from workbench.eval.suite import suite
from workbench.labs import check_drafter
from workbench.registry import param, register


# %% [markdown]
# ## The interface
#
# `state.tokens` is the prompt and everything generated so far; its last token, `state.pending`, is the
# tree's root (the engine runs it together with your drafts). `DraftTree.chain(tokens)` makes a chain; an
# empty `DraftTree()` drafts nothing (plain decoding for that step). `begin(state)` is called once after the
# prefill: reset per-run state there. Parameters are dataclass fields declared with `param(default, help,
# min=, max=)`: the registry reads them for the CLI, the app and spec strings (`decode=bigram:k=4`).
#
# ## Exercise: fill in `begin` and `propose`
#
# Keep `self._next` (token -> the token that most recently followed it) and `self._seen` (how many tokens of
# `state.tokens` are already in the table), so each step only adds the new ones.
# %%
@register("decoding", "bigram", lossless=True)
@dataclass
class BigramDrafter(Drafter):
    """Draft by following the most recent successor of each token, from the pending one."""

    k: int = param(4, "most tokens drafted per step", min=1, max=32)
    _next: dict = field(init=False, default_factory=dict)
    _seen: int = field(init=False, default=0)

    def begin(self, state):
        # BEGIN SOLUTION
        self._next, self._seen = {}, 0
        # END SOLUTION

    def propose(self, state):
        # BEGIN SOLUTION
        tokens = state.tokens
        for i in range(max(self._seen - 1, 0), len(tokens) - 1):
            self._next[tokens[i]] = tokens[i + 1]
        self._seen = len(tokens)
        chain, token = [], state.pending
        while len(chain) < self.k and token in self._next:
            token = self._next[token]
            if token in chain:
                break
            chain.append(token)
        return DraftTree.chain(chain)
        # END SOLUTION
# %% [markdown]
# ## Is it lossless?
#
# `check_drafter` runs your registered drafter through the project's harness: greedy output must equal plain
# decoding's, token for token, and sampled output (temperature 1, a few hundred seeds on a tiny random
# model) must follow the target's exact distribution within the bound that sampling noise allows. It also
# requires that some drafts were accepted, so a drafter that never drafts does not pass by doing nothing.
# %%
result = check_drafter("bigram")
# %% [markdown]
# Losslessness is the engine's job as much as yours: your drafter only proposes, and the acceptor decides. A
# drafter can be wrong only by breaking the interface (a token outside the vocabulary, a malformed tree),
# which `DraftTree` refuses with a clear error.
#
# ## The race
#
# On a summary (which copies its prompt), your bigram drafter against prompt lookup and plain decoding,
# greedy, 16 tokens each; speed-ups are against plain decoding measured here.
# %%
wb = Workbench()
prompt = suite(["summarization"], per_category=1)[0].prompt
results = {}
for spec in ["decode=plain", "decode=prompt_lookup", "decode=bigram:k=4"]:
    trace = wb.generate(prompt, spec + ";max_new_tokens=16")
    results[spec] = trace
base = results["decode=plain"]
for spec, trace in results.items():
    s = trace.summary()
    same = trace.token_ids == base.token_ids
    print(f"{spec:>22}: {s['mean_accepted_length']:.2f} tokens/forward, {s['tok_per_s']:5.1f} tok/s "
          f"({s['tok_per_s'] / base.summary()['tok_per_s']:.2f}x plain), same text as plain: {same}")
assert all(t.token_ids == base.token_ids for t in results.values())
# %% [markdown]
# ## Going further
#
# * Draft a **tree** instead of a chain: keep the two most recent successors and branch (`DraftTree(tokens,
#   parents)`); `check_drafter` still applies.
# * Learn in `observe(state, tree, acceptance, logits)`: the target's logits at every node tell you what it
#   would have said; token recycling (`workbench/decoding/token_recycling.py`) keeps its top-k.
# * Run it on the whole prompt suite: in a Python session that has registered it,
#   `workbench.bench` with `decode=bigram` (see `workbench bench --help`).
