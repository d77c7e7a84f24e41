"""Medusa: extra decoding heads on the target's last layer, verified as a candidate tree.

Paper: Cai et al., "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads",
arXiv 2401.10774. Head d is a residual block, h + SiLU(W_d h), on the target's last-layer state (after its
final norm) followed by the target's LM head; it guesses the token d places after the one the target predicts
from that state. Each step the heads read the state the pending token came from (the engine keeps it, no
second forward), their top-k lists fill a static tree shaped by the heads' measured acceptance
(`draft_heads.tree_paths`), and the target verifies the whole tree in one forward with tree attention.
Training is Medusa-2's self-distillation on the target's own greedy outputs (`workbench train medusa`); the
block's weight starts at zero, so an untrained head repeats the target's own prediction.

Left out: each head's own trainable copy of the LM head (here the heads share the target's frozen LM head,
as Medusa-1 can; a 49k x 576 copy per head would be 28M parameters to train on a CPU), joint training of
the backbone (Medusa-2), and typical acceptance by default (`accept=typical` gives it; the default walk
is exact matching, so the output is plain decoding's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workbench.decoding.base import DecodeState
from workbench.decoding.draft_heads import HeadDrafter, final_norm, tree_size
from workbench.registry import register


class MedusaHeads(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(heads))
        for block in self.blocks:  # start as the identity: each head first repeats the target's guess
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[B, hidden] normed states -> [B, heads, hidden] features for the LM head."""
        return torch.stack([h + nn.functional.silu(block(h)) for block in self.blocks], dim=1)


@register("decoding", "medusa", lossless=True)
@dataclass
class Medusa(HeadDrafter):
    """Trained Medusa heads (`workbench train medusa`) draft a candidate tree from their top-k guesses."""

    kind = "medusa"
    module_class = MedusaHeads
    # 6 nodes: the fastest tree on the 2-core CPU (24 verify too many rows; docs/performance.md)
    nodes: int = tree_size(6)

    @staticmethod
    def head_logits(module: MedusaHeads, model, hidden: torch.Tensor, following: torch.Tensor) -> torch.Tensor:
        """Training and evaluation: [B, hidden] normed states -> [B, heads, vocab] float32 logits."""
        return module(hidden) @ module.head_weight.T

    def draft(self, state: DecodeState) -> list[int]:
        model = state.model
        features = self.trained(final_norm(model, state.hidden[-1:]))[0]  # [heads, hidden]
        ranked = self.guesses(model, features)  # [heads, width]: one product for all heads
        return [ranked[len(p) - 1][p[-1]] for p in self.paths]
