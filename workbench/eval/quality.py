"""Teacher-forced quality through the cache: perplexity, KL divergence and top-1 agreement.

The protocol (docs/quality.md), the same for KV-cache policies, weight transforms and the kvpress peer:

1. Take L consecutive tokens of the evaluation text (`workbench.text.evaluation_text`; L = context).
2. Prefill the first P = L - S tokens in one forward and commit them; the policies then run
   `on_prefill_end`, which is where they compress or evict. The prefill's last row scores token P.
3. Feed tokens P .. L-2 one per step through the engine's own decoding loop (forward with the cache,
   `cache.commit()`, every policy's `on_step_end`), each step's token forced to the text's; step i's
   logits score token i + 1.

So S tokens are scored, each from a forward that read the compressed cache (except the first, which the
prefill produced before compressing, as in the engine). With the dense cache this equals one full forward
over the L tokens (tested). Perplexity is exp of the mean negative log-likelihood over the scored tokens;
KL(reference || test) and top-1 agreement compare each scored token's whole next-token distribution with
the reference run's: the dense cache on the uncompressed model, same dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.cache.base import CachePolicy
from workbench.decoding.base import Acceptance, Acceptor, DraftTree
from workbench.engine import Engine
from workbench.errors import ModelError, PromptError
from workbench.models import LoadedModel
from workbench.models.llama import LlamaModel
from workbench.sampling import Sampler
from workbench.spec import RunSpec
from workbench.text import evaluation_text

BYTE_VOCAB = 256  # models without a tokenizer (tiny random ones) read text as UTF-8 bytes


@dataclass
class Forced:
    """One teacher-forced pass over a window of tokens.

    logprobs: [S, vocab] float32 log-softmax of every scored position; targets: [S] the true tokens.
    Cache bytes are the live bytes (the tokens held, in their stored form: `KVCache.nbytes`) after
    `on_prefill_end` and after the last step; the spare capacity a cache allocates is not counted here.
    """

    logprobs: torch.Tensor
    targets: torch.Tensor
    cache_bytes_prefill: int
    cache_bytes_end: int
    decode_s: float  # wall time of the S - 1 one-token engine steps (forward, commit, policy hooks, step event)


def encode(loaded: LoadedModel, text: str) -> list[int]:
    """Token ids of `text`, as `Workbench.prompt_ids` makes them without a chat template; a model without a
    tokenizer reads the text's UTF-8 bytes as ids."""
    if loaded.tokenizer is not None:
        return loaded.tokenizer(text)["input_ids"]
    if loaded.config.vocab_size < BYTE_VOCAB:
        raise ModelError(f"model {loaded.name} has no tokenizer and a vocabulary of {loaded.config.vocab_size} "
                         f"(< {BYTE_VOCAB}), so it cannot read text as bytes")
    return list(text.encode())


def decode(loaded: LoadedModel, ids: Sequence[int]) -> str:
    """The inverse of `encode`."""
    if loaded.tokenizer is not None:
        return loaded.tokenizer.decode(list(ids), skip_special_tokens=True)
    return bytes(i for i in ids if i < BYTE_VOCAB).decode("utf-8", errors="replace")


def evaluation_windows(loaded: LoadedModel, context: int, windows: int) -> list[list[int]]:
    """`windows` consecutive, non-overlapping windows of `context` tokens from the start of the evaluation
    text. Only as much text as needed is tokenized (a margin, then more if it falls short)."""
    text = evaluation_text()
    needed = context * windows
    chars = needed * 8
    while True:
        ids = encode(loaded, text[:chars])
        if len(ids) > needed or chars >= len(text):
            break
        chars *= 2
    if len(ids) < needed:
        raise PromptError(f"the evaluation text has only {len(ids)} tokens for this model; "
                          f"--context {context} x --windows {windows} needs {needed}")
    return [ids[w * context:(w + 1) * context] for w in range(windows)]


@dataclass
class _ForcedAcceptor(Acceptor):
    """Teacher forcing inside the engine: each step's token is the text's next token, whatever the model
    predicts; the row that scores it ([1, vocab] logits) is kept."""

    targets: list[int]
    rows: list[torch.Tensor] = field(default_factory=list)

    def accept(self, tree: DraftTree, logits: torch.Tensor, probs: torch.Tensor, sampler: Sampler) -> Acceptance:
        self.rows.append(logits[:1])
        return Acceptance([], self.targets[len(self.rows) - 1])


def teacher_forced(model: LlamaModel, policies: list[CachePolicy], ids: Sequence[int], prefill: int,
                   tokenizer: Any = None, memory: dict | None = None) -> Forced:
    """Run the protocol (module docstring) on one window: prefill `prefill` tokens, then one token per step.

    This is the engine's own loop (`Engine.run`: policies prepared, cache built, prefill, commit, policy
    hooks) with plain decoding and every token forced. The policies are prepared first (`CachePolicy.prepare`,
    e.g. double sparsity's offline calibration) with `tokenizer` and `memory`; pass the Workbench's
    per-model memory so that is done once, not per window."""
    if not 0 < prefill < len(ids):
        raise ValueError(f"prefill must be in [1, {len(ids) - 1}], got {prefill}")
    targets = list(ids[prefill:])
    forced = _ForcedAcceptor(targets)
    engine = Engine(model, RunSpec(max_new_tokens=len(targets)), memory=memory, tokenizer=tokenizer,
                    acceptor=forced, policies=policies)
    events = list(engine.run(list(ids[:prefill])))
    decode_s = (events[-1].elapsed_ns - events[0].elapsed_ns) / 1e9
    logprobs = torch.log_softmax(torch.cat(forced.rows).float(), dim=-1).cpu()
    return Forced(logprobs, torch.tensor(targets), events[0].cache_live_bytes, events[-1].cache_live_bytes, decode_s)


def nll(run: Forced) -> torch.Tensor:
    """Negative log-likelihood of each scored token, [S]."""
    return -run.logprobs.gather(1, run.targets[:, None])[:, 0]


def kl_per_token(reference: Forced, test: Forced) -> torch.Tensor:
    """KL(reference || test) in nats at each scored position, [S] (0 where the distributions are equal)."""
    p = reference.logprobs.exp()
    return (p * (reference.logprobs - test.logprobs)).sum(-1).clamp_min(0)


def compare(references: list[Forced], tests: list[Forced]) -> dict[str, Any]:
    """Quality of `tests` against `references` (one Forced per window, the same windows in the same order)."""
    for ref, test in zip(references, tests):
        if not torch.equal(ref.targets, test.targets):
            raise ValueError("the test and reference runs scored different tokens")
    losses = torch.cat([nll(t) for t in tests]).double()
    ref_losses = torch.cat([nll(r) for r in references]).double()
    kl = torch.cat([kl_per_token(r, t) for r, t in zip(references, tests)]).double()
    top1 = torch.cat([(r.logprobs.argmax(-1) == t.logprobs.argmax(-1)) for r, t in zip(references, tests)])
    n = losses.numel()
    diff = losses - ref_losses
    mean_nll = float(losses.mean())
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "nll_se": float(losses.std() / math.sqrt(n)) if n > 1 else 0.0,
        # paired over the same tokens: what the difference to the reference is, and its standard error
        "delta_nll": float(diff.mean()),
        "delta_nll_se": float(diff.std() / math.sqrt(n)) if n > 1 else 0.0,
        "delta_ppl_pct": 100 * (math.exp(mean_nll - float(ref_losses.mean())) - 1),
        "kl": float(kl.mean()),
        "kl_p95": float(kl.quantile(0.95)) if n > 1 else float(kl.mean()),
        "top1_agreement": float(top1.float().mean()),
        "scored_tokens": n,
    }


def run_windows(run_one: Callable[[list[int]], Forced], windows: list[list[int]]) -> tuple[list[Forced], dict]:
    """Run one configuration over every window; its bytes (mean over windows) and decode speed."""
    runs = [run_one(ids) for ids in windows]
    steps = sum(r.targets.numel() - 1 for r in runs)
    decode_s = sum(r.decode_s for r in runs)
    return runs, {
        "cache_bytes_prefill": round(sum(r.cache_bytes_prefill for r in runs) / len(runs)),
        "cache_bytes_end": round(sum(r.cache_bytes_end for r in runs) / len(runs)),
        "decode_tok_per_s": steps / decode_s if decode_s > 0 else None,
    }
