# Lab 2 source (scripts/make_notebooks.py writes the notebooks from it).
# ruff: noqa: E402
# %% [markdown]
# # Lab 2: speculative decoding from scratch
#
# Lab 1 showed that one forward over a few tokens costs about as much as over one. Speculative decoding
# (Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318) exploits it: a cheap **draft** proposes
# `k` tokens, the **target** scores all of them in one forward, and an **acceptance rule** keeps a prefix of
# the drafts plus one token of the target's own. Done right, the output has *exactly* the target's
# distribution: the speed-up costs no quality.
#
# ## Deriving the acceptance rule
#
# The draft drew token `x` from its distribution `q`; the target's distribution at that position is `p`. We
# want to commit a token distributed as `p`, using `x` as often as possible. Rule: accept `x` with probability
# `min(1, p(x)/q(x))`; otherwise draw from the residual `r = max(0, p - q) / Z`.
#
# * P(commit x via acceptance) = q(x) min(1, p(x)/q(x)) = min(p(x), q(x)).
# * P(reject) = 1 - sum_y min(p(y), q(y)) = sum_y max(0, p(y) - q(y)) = Z.
# * P(commit x) = min(p(x), q(x)) + Z * max(0, p(x) - q(x)) / Z = p(x). ∎
#
# The draft is kept with probability sum_y min(p, q) = 1 - TV(p, q): the closer the draft, the more it is
# kept. After the first rejection the later drafts are discarded (they were conditioned on the rejected one).
# %%
import matplotlib.pyplot as plt
import torch

from workbench import Workbench
from workbench.engine import Engine
from workbench.labs import LabCheckError, check_expected_tokens, check_verify
from workbench.metrics import chain_acceptance
from workbench.spec import RunSpec, TechniqueSpec
from workbench.testing import exact_marginals, sampled, tiny_model, tv, tv_bound


# %% [markdown]
# ## Exercise 1: the rule
#
# Write `verify(p, q, x, generator)`: `p`, `q` are probability vectors, `x` the drafted token (drawn from
# `q`). Return the committed token as an int. Use `generator` for randomness (`torch.rand(1,
# generator=generator)`, `torch.multinomial(..., 1, generator=generator)`). The check runs it 20,000 times and
# compares what comes out with `p`.
# %%
def verify(p, q, x, generator):
    # BEGIN SOLUTION
    if float(torch.rand(1, generator=generator)) < min(1.0, float(p[x] / q[x])):
        return x
    residual = (p - q).clamp_min(0)
    return int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    # END SOLUTION


check_verify(verify)
# %% [markdown]
# A wrong rule fails the same check. "Accept every draft" commits `q`'s distribution, not `p`'s:
# %%
try:
    check_verify(lambda p, q, x, generator: x)
except LabCheckError as err:
    print("the check rejects it:", err)
# %% [markdown]
# ## End to end: the workbench keeps the target's distribution
#
# The rule is one part; the engine must also commit the right cache entries, draw in the right order and
# resample after a rejection. `workbench.testing` is the harness the project's own tests use
# (`tests/test_distribution.py`): a tiny random model with 8 tokens, whose exact distribution over its first
# 4 sampled tokens is computed by enumerating every continuation, against the empirical distribution of
# many seeded runs. Speculative sampling (`draft_model`, with `speculative` acceptance) passes; the same
# drafter with every draft accepted unverified does not.
# %%
threads = torch.get_num_threads()
torch.set_num_threads(1)  # tiny models are fastest on one thread
tiny = tiny_model()
exact = exact_marginals(tiny)
trials = 500
bound = tv_bound(trials, 8)
ours, accepted = sampled(tiny, "draft_model", trials)
wrong, _ = sampled(tiny, "draft_model", trials, wrong=True)
plain, _ = sampled(tiny, "plain", trials)
torch.set_num_threads(threads)
for label, marg in (("plain sampling", plain), ("speculative sampling", ours), ("accept every draft", wrong)):
    print(f"{label:>22}: max TV over 4 positions = {float(tv(marg, exact).max()):.3f} (noise bound {bound:.3f})")
assert float(tv(ours, exact).max()) < bound < float(tv(wrong, exact).max())
# %%
fig, axes = plt.subplots(1, 3, figsize=(10, 2.6), sharey=True)
for ax, (label, marg) in zip(axes, (("exact", exact), ("speculative", ours), ("accept every draft", wrong))):
    ax.bar(range(8), marg[1].numpy())
    ax.set_title(f"{label}: 2nd token")
    ax.set_xlabel("token")
plt.tight_layout()
plt.show()
# %% [markdown]
# ## Exercise 2: how many tokens per forward?
#
# If each draft is accepted independently with probability `alpha`, a step with `k` drafts commits the
# accepted prefix plus one token of the target's. Write `expected_tokens(alpha, k)` (Leviathan et al.,
# eq. 1).
# %%
def expected_tokens(alpha, k):
    # BEGIN SOLUTION
    return float(k + 1) if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    # END SOLUTION


check_expected_tokens(expected_tokens)
# %% [markdown]
# ## Theory against measurement
#
# On the tiny model: for each draft length `k`, sample 30 runs, estimate `alpha` from the steps
# (`workbench.metrics.chain_acceptance`: accepted / (accepted + rejecting steps)) and compare the measured
# tokens per step with your formula.
# %%
torch.set_num_threads(1)
rows = []
for k in (1, 2, 3, 4, 6):
    events = []
    for seed in range(30):
        spec = RunSpec(max_new_tokens=16, temperature=1.0, seed=seed,
                       decode=TechniqueSpec("draft_model", {"layers": 2, "k": k}))
        events += list(Engine(tiny, spec).run([3, 4, 5, 3, 4]))
    stats = chain_acceptance(type("T", (), {"events": events})())
    rows.append((k, stats["alpha"], expected_tokens(stats["alpha"], k), stats["tokens_per_step"]))
torch.set_num_threads(threads)
for k, alpha, predicted, measured in rows:
    print(f"k={k}: alpha={alpha:.2f}  predicted {predicted:.2f}  measured {measured:.2f} tokens per step")
plt.figure(figsize=(5, 3))
plt.plot([r[0] for r in rows], [r[2] for r in rows], "o--", label="(1 - a^(k+1)) / (1 - a)")
plt.plot([r[0] for r in rows], [r[3] for r in rows], "s-", label="measured")
plt.xlabel("draft length k")
plt.ylabel("tokens per target forward")
plt.legend()
plt.show()
# %% [markdown]
# The formula assumes every draft is accepted with the same probability, independently. Real drafts are
# not: an easy stretch of text is accepted token after token, a hard one is rejected at once. So the
# measurement drifts from the formula as `k` grows; `alpha` is the estimate that makes the two agree for a
# geometric acceptance.
#
# ## On the embedded model
#
# A draft made from the target itself, its weights quantized to int4 (`draft_model:compress=int4:group=32`),
# is close to the target (high alpha). At temperature 0.8 the acceptance rule is the one you wrote:
# %%
wb = Workbench()
trace = wb.generate("Why do leaves change colour in autumn?",
                    "decode=draft_model:k=4,compress=int4:group=32;temperature=0.8;seed=0;max_new_tokens=16")
s = trace.summary()
print(repr(trace.text))
print(f"alpha {s['alpha']:.2f}: predicted {s['predicted_tokens_per_step']:.2f}, measured {s['tokens_per_step']:.2f} "
      f"tokens per step; {s['target_forwards']} target forwards for {s['n_new_tokens']} tokens")
# %% [markdown]
# ## Watch it: a race
#
# `workbench.widgets.Race` runs configurations side by side on one prompt, streaming the tokens coloured by
# source (accepted drafts, the target's own tokens); `DraftTreeView` shows the tree each step verified, with a
# slider over the steps. (This cell stands alone: it can be run on its own once the kernel has started.)
# %%
from IPython.display import display

from workbench.widgets import DraftTreeView, Race

race = Race("Why do leaves change colour in autumn?",
            ["decode=plain", "decode=draft_model:k=4,compress=int4:group=32"], max_new_tokens=12)
display(race)
race.wait(timeout=300)
DraftTreeView(race.traces[1], race.wb)
# %% [markdown]
# **Questions.** (1) With alpha = 0.8, what `k` maximises tokens per step *per unit of cost*, if a draft token
# costs 10% of a target forward? (2) Why must a rejected draft's later tokens be thrown away even when the
# target would have accepted them?
