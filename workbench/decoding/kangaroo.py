"""Kangaroo: the target's first layers plus a small trained adapter draft for it, with double early exit.

Paper: Liu et al., "Kangaroo: Lossless Self-Speculative Decoding via Double Early Exiting", arXiv 2404.18911.
The draft model is a shallow sub-network of the target, its first N layers (the first early exit), followed
by a small trained adapter (one multi-head attention between two normalisations) and the target's own LM
head. It drafts autoregressively: each draft token runs the N layers on the target's own KV cache (the
shallow layers' cache is the target's first-N-layer cache, shared as in the paper: the draft's entries are
rolled back before verification) and the adapter over the shallow states of the whole sequence (its keys
are kept for committed positions, cut back past a rejected draft). Drafting stops early (the second exit)
after a token whose top-1 draft probability is below `threshold`, or after `k` tokens. The target verifies
the chain with lossless speculative sampling (exact matching under greedy decoding). The adapter is trained
by `workbench train kangaroo` on the target's own greedy outputs (self-distillation; the shallow states of
each sequence are recomputed once, N layers without a cache).

Left out: reusing the drafted tokens' shallow states in verification (the paper's target resumes from layer
N for them; here the engine's verification runs every layer), distillation from the target's full
distribution (the adapter learns its chosen tokens), and the paper's tuned exit layer per model (N is a
setting, 2 by default as in the paper's Vicuna runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from workbench.decoding.base import DecodeState, Drafter, DraftTree
from workbench.decoding.draft_attention import DraftAttention, KeptKeys, causal_mask
from workbench.decoding.draft_heads import load_trained
from workbench.errors import SpecError
from workbench.registry import param, register


class KangarooAdapter(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm_in, self.norm_out = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.attention = DraftAttention(hidden)

    def forward(self, shallow: torch.Tensor, positions: torch.Tensor, kept: KeptKeys | None = None) -> torch.Tensor:
        """Shallow states [1, T, hidden] at positions [T] -> what the LM head reads; with `kept`, the earlier
        positions' keys are attended to as well and the new ones are kept."""
        x = self.norm_in(shallow)
        keys, values = self.attention.keys(x, positions)
        if kept is not None:
            kept.add(keys, values)
            keys, values = kept.keys, kept.values
        return self.norm_out(shallow + self.attention.attend(x, positions, keys, values,
                                                             causal_mask(positions, keys.shape[2])))


@torch.no_grad()
def shallow_states(model, tokens: torch.Tensor, layers: int) -> torch.Tensor:
    """[T, hidden] float32: the output of the target's first `layers` layers over a whole sequence (no cache)."""
    tokens = tokens.to(model.device)
    out = model(tokens, torch.arange(len(tokens), device=model.device), None, layers=list(range(layers)),
                final_hidden=True, no_logits=True)
    return out.final_hidden.float()


@register("decoding", "kangaroo", lossless=True)
@dataclass
class Kangaroo(Drafter):
    """The target's first `layers` layers and a trained adapter (`workbench train kangaroo`) draft a chain."""

    default_acceptor = "speculative"
    draft_distribution = True  # every tree carries its draft distribution q
    kind: ClassVar[str] = "kangaroo"
    needs_training: ClassVar[bool] = True  # the registry-wide matrices leave it to tests/test_kangaroo.py

    layers: int = param(2, "the shallow sub-network: the target's first N layers (must match a trained adapter)",
                        min=1, max=512)
    k: int = param(6, "most tokens drafted per step", min=1, max=32)
    threshold: float = param(0.6, "the second early exit: stop drafting after a token whose top draft probability "
                             "is below this", min=0.0, max=1.0)
    trained: Any = field(init=False, default=None, repr=False)
    _kept: KeptKeys = field(init=False, default_factory=KeptKeys, repr=False)
    _generator: torch.Generator | None = field(init=False, default=None, repr=False)

    # What `training.heads.train_heads` needs: the adapter guesses one token past the shallow state's own.
    @classmethod
    def depth(cls, settings: dict[str, Any]) -> int:
        return 1

    @classmethod
    def training_data(cls, sequences, model, settings: dict[str, Any]):
        from workbench.training.heads import Contexts

        return Contexts.of(sequences, model, 1, lambda seq: shallow_states(model, seq.tokens, settings["layers"]))

    @classmethod
    def new_module(cls, model, settings: dict[str, Any]) -> KangarooAdapter:
        """An untrained adapter whose output norm starts as the target's final norm; the target's LM head (frozen,
        float32) beside it."""
        cls.check_layers(model, settings["layers"])
        module = KangarooAdapter(model.config.hidden_size)
        with torch.no_grad():
            module.norm_out.weight.copy_(model.norm.float())
        module.head_weight = model.lm_head.weight.detach().float()
        return module

    @staticmethod
    def head_logits(module: KangarooAdapter, model, inputs: list, following: torch.Tensor) -> torch.Tensor:
        """Training and evaluation: [(shallow states [T, hidden], positions t [P])] -> [P, 1, vocab] logits of the
        token after t + 1 (the state of token t + 1, the target's own next token, guesses following[:, 1])."""
        rows = [module(states[None], torch.arange(len(states)))[0, t + 1] for states, t in inputs]
        return (torch.cat(rows) @ module.head_weight.T)[:, None]

    @staticmethod
    def check_layers(model, layers: int) -> None:
        n = model.config.num_layers
        if layers >= n:
            raise SpecError(f"kangaroo: layers={layers} must be below the model's {n} layers (the shallow "
                            "sub-network is a prefix of the target)")

    def settings(self) -> dict[str, Any]:
        return {"layers": self.layers}

    def check_run(self, model, prompt_tokens: int) -> None:
        self.check_layers(model, self.layers)

    def begin(self, state: DecodeState) -> None:
        model = state.model
        self.trained, _ = load_trained(state, self.kind, self.settings(),
                                       lambda _s: KangarooAdapter(model.config.hidden_size))
        self._generator = torch.Generator(device=model.device).manual_seed(state.sampler.seed + 1)
        # the adapter's keys for the prompt: its shallow states, the first N layers once more without a cache
        shallow = shallow_states(model, torch.tensor(state.prompt_ids), self.layers)
        self._kept = KeptKeys()
        self.trained(shallow[None], torch.arange(len(shallow), device=model.device), self._kept)

    def propose(self, state: DecodeState) -> DraftTree:
        model, cache, sampler = state.model, state.cache, state.sampler
        self._kept.cut(state.pending_position)  # keys of committed positions only: a rejected draft's go
        plan = list(range(self.layers))
        token, position = state.pending, state.pending_position
        drafted: list[int] = []
        dists: list[torch.Tensor] = []
        while True:
            # The shallow layers on the target's cache, then the adapter (keeping this position's keys). The last
            # drafted token runs too, without the LM head: if it is accepted, its keys are ready next step.
            out = model(torch.tensor([token], device=model.device), torch.tensor([position], device=model.device),
                        cache, layers=plan, final_hidden=True, no_logits=True)
            features = self.trained(out.final_hidden.float()[None], torch.tensor([position], device=model.device),
                                    self._kept)[0]
            if len(drafted) == self.k or (dists and float(dists[-1].max()) < self.threshold):
                break
            q = sampler.probs(model.lm_head(features.to(model.dtype)).float()[0])
            token = int(q.argmax()) if sampler.greedy else int(torch.multinomial(q, 1, generator=self._generator))
            drafted.append(token)
            dists.append(q)
            position += 1
        cache.rollback()  # drop the draft's entries in the shallow layers: verification sees committed tokens only
        return DraftTree.chain(drafted, torch.stack(dists))
