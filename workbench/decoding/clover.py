"""Clover: draft heads that attend over the sequence and read the tokens drafted before them.

Paper: Xiao et al., "Clover: Regressive Lightweight Speculative Decoding with Sequential Knowledge",
arXiv 2405.00263. Medusa's heads see one state; Clover adds three pieces on top of the head design:
- the augmenting block: one transformer layer (causal self-attention and an MLP) run over the target's
  normed last-layer states of the whole sequence, giving states tuned for speculation rather than for the
  target's own next token. It runs once per committed position (its keys and values are kept), never per node;
- the regressive attention decoder, shared by all heads: head d's query fuses the embedding of the token
  before its own (the target's pending token for head 1, then the drafted path) with the previous head's
  state (the augmented state for head 1), and attends over the augmented states of the whole sequence;
- per head, Medusa's residual block on that state, then the target's LM head.
Drafting walks the candidate tree depth by depth as Hydra does: every node of a depth that has children runs
the decoder in one batched call, and its top-k guesses become those children. The tree's shape comes from the
heads' measured held-out acceptance (`draft_heads.tree_paths`); the target verifies it in one forward with
exact matching (lossless). States come from the engine: the prefill's for the prompt, each verification's for
the committed tokens (no second forward). Training: `workbench train clover`, self-distillation on the target's
greedy outputs, teacher-forced over whole sequences (`training.heads.Contexts`).

Left out: Clover's per-head attention weights (one decoder serves every head here, with a per-head block) and its
dynamic tree; Clover-2's distillation from the target's full distribution (the heads learn from its chosen
tokens only) and its extra layers; a trainable LM head (the target's frozen one is shared).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workbench.decoding.base import DecodeState
from workbench.decoding.draft_attention import DraftAttention, KeptKeys, causal_mask
from workbench.decoding.draft_heads import HeadDrafter, final_norm, tree_size
from workbench.registry import register


class CloverHeads(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.augment_norm, self.mlp_norm, self.decoder_norm = (nn.RMSNorm(hidden) for _ in range(3))
        self.augment_attention = DraftAttention(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden))
        self.fuse = nn.Linear(2 * hidden, hidden)  # [token embedding; previous head's state] -> the query's input
        self.decoder = DraftAttention(hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(heads))
        for block in self.blocks:  # Medusa's residual blocks start as the identity
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)

    def augment(self, h: torch.Tensor, positions: torch.Tensor, kept: KeptKeys | None = None) -> torch.Tensor:
        """The augmenting block over normed states h [1, T, hidden] at positions [T]; with `kept`, the earlier
        positions' keys are attended to as well and the new ones are kept."""
        x = self.augment_norm(h)
        keys, values = self.augment_attention.keys(x, positions)
        if kept is not None:
            kept.add(keys, values)
            keys, values = kept.keys, kept.values
        y = h + self.augment_attention.attend(x, positions, keys, values, causal_mask(positions, keys.shape[2]))
        return y + self.mlp(self.mlp_norm(y))

    def memory(self, augmented: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's keys and values of augmented states [1, T, hidden]."""
        return self.decoder.keys(self.decoder_norm(augmented), positions)

    def regress(self, state: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One decoder step: the previous head's states and the path's last tokens [1, R, hidden] -> new states."""
        query = self.fuse(torch.cat([embeds, state], dim=-1))
        return query + self.decoder.attend(query, positions, keys, values, mask)

    def feature(self, depth: int, state: torch.Tensor) -> torch.Tensor:
        """Head `depth`'s (1-based) residual block: what the LM head reads."""
        return state + nn.functional.silu(self.blocks[depth - 1](state))


@register("decoding", "clover", lossless=True)
@dataclass
class Clover(HeadDrafter):
    """Trained Clover heads (`workbench train clover`): sequence attention, regressive, an augmenting block."""

    kind = "clover"
    module_class = CloverHeads
    # 6 nodes: the fastest tree on the 2-core CPU (24 verify too many rows; docs/performance.md)
    nodes: int = tree_size(6)
    _augment_keys: KeptKeys = field(init=False, default_factory=KeptKeys, repr=False)
    _memory: KeptKeys = field(init=False, default_factory=KeptKeys, repr=False)  # the decoder's keys
    _last: torch.Tensor | None = field(init=False, default=None, repr=False)  # augmented state before pending

    @classmethod
    def new_module(cls, model, settings: dict[str, Any]) -> CloverHeads:
        module = super().new_module(model, settings)
        module.embed_weight = model.embed.weight.detach().float()  # frozen: the decoder reads the path's tokens
        return module

    @classmethod
    def training_data(cls, sequences, model, settings: dict[str, Any]):
        from workbench.training.heads import Contexts

        return Contexts.of(sequences, model, cls.depth(settings), lambda seq: final_norm(model, seq.hidden))

    @staticmethod
    def head_logits(module: CloverHeads, model, inputs: list, following: torch.Tensor) -> torch.Tensor:
        """Training and evaluation, teacher-forced: [(normed states [T, hidden], positions t [P])] and the tokens
        after each t [sum P, heads + 1] -> [sum P, heads, vocab] logits."""
        out, row = [], 0
        for states, t in inputs:
            tokens = following[row:row + len(t)].clamp_min(0)  # -1 rows (past the end) are ignored by the loss
            row += len(t)
            positions = torch.arange(len(states))
            augmented = module.augment(states[None], positions)
            keys, values = module.memory(augmented, positions)
            mask = causal_mask(t, len(states))  # the query for position t sees the sequence up to t
            state, features = augmented[0, t], []
            for d in range(1, len(module.blocks) + 1):
                embeds = module.embed_weight[tokens[:, d - 1]]  # the token before head d's: x_{t+d}
                state = module.regress(state[None], embeds[None], t + d, keys, values, mask)[0]
                features.append(module.feature(d, state))
            out.append(torch.stack(features, dim=1))
        return torch.cat(out) @ module.head_weight.T

    def wants_prompt_states(self) -> bool:
        return True

    def begin(self, state: DecodeState) -> None:
        super().begin(state)
        self._augment_keys, self._memory, self._last = KeptKeys(), KeptKeys(), None

    def observe_prompt(self, state: DecodeState, hidden: torch.Tensor) -> None:
        self._extend(state, hidden)

    def _extend(self, state: DecodeState, hidden: torch.Tensor) -> None:
        """Augment the newly committed positions' states and keep their decoder keys."""
        positions = torch.arange(len(self._memory), len(self._memory) + len(hidden), device=hidden.device)
        augmented = self.trained.augment(final_norm(state.model, hidden)[None], positions, self._augment_keys)
        self._memory.add(*self.trained.memory(augmented, positions))
        self._last = augmented[0, -1]

    def draft(self, state: DecodeState) -> list[int]:
        model = state.model
        new = state.pending_position - len(self._memory)  # states of the tokens committed last step
        if new > 0:
            self._extend(state, state.hidden[-new:])
        previous: dict[tuple[int, ...], torch.Tensor] = {(): self._last}  # a node's children's query state
        token: dict[tuple[int, ...], int] = {}
        for depth in range(1, len(self.paths[-1]) + 1):  # paths are sorted by depth
            level = [p for p in self.paths if len(p) == depth]
            parents = sorted({p[:-1] for p in level})
            ids = torch.tensor([token[p] if p else state.pending for p in parents], device=model.device)
            positions = torch.full((len(parents),), state.pending_position + depth - 1, device=model.device)
            states = self.trained.regress(torch.stack([previous[p] for p in parents])[None],
                                          model.embed(ids).float()[None], positions, self._memory.keys,
                                          self._memory.values, None)[0]
            features = self.trained.feature(depth, states)
            ranked = self.guesses(model, features)
            row = {parent: i for i, parent in enumerate(parents)}
            for p in level:
                token[p] = ranked[row[p[:-1]]][p[-1]]
                previous[p] = states[row[p[:-1]]]
        return [token[p] for p in self.paths]
