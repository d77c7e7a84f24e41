"""Hydra: draft heads that read the tokens drafted before them, verified as a candidate tree.

Paper: Ankner et al., "Hydra: Sequentially-Dependent Draft Heads for Medusa Decoding", arXiv 2402.05109.
Medusa's heads guess every future position from the same state, blind to what the earlier heads guessed;
a Hydra head d also reads the embeddings of the tokens on its path so far: the target's own next token
and the d - 1 drafted after it. Here head d is an MLP, h + W_out SiLU(W_in [h; e_1; ...; e_d]), on the
target's normed last-layer state h, followed by the target's LM head. Drafting walks the tree depth by
depth: every node of a depth that has children runs its head in one batched call, and its top-k guesses
become those children. The tree's shape is Medusa's, from the heads' measured acceptance
(`draft_heads.tree_paths`); verification is the engine's exact matching walk (lossless).
Training: self-distillation on the target's greedy outputs with teacher forcing (`workbench train hydra`).

Left out: Hydra++'s extra decoder layer over the sequence and its distillation from the target's full
distribution (the heads learn from the target's chosen tokens only), and a per-head LM head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workbench.decoding.base import DecodeState
from workbench.decoding.draft_heads import HeadDrafter, final_norm, tree_size
from workbench.registry import register


class HydraHeads(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.inputs = nn.ModuleList(nn.Linear((d + 2) * hidden, hidden) for d in range(heads))
        self.outputs = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(heads))
        for out in self.outputs:  # start as the identity on h
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)

    def head(self, depth: int, h: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Head `depth` (1-based): h [B, hidden], embeds [B, depth, hidden] -> [B, hidden] features."""
        x = torch.cat([h, embeds.flatten(1)], dim=1)
        return h + self.outputs[depth - 1](nn.functional.silu(self.inputs[depth - 1](x)))


@register("decoding", "hydra", lossless=True)
@dataclass
class Hydra(HeadDrafter):
    """Trained Hydra heads (`workbench train hydra`): each reads the path drafted before it."""

    kind = "hydra"
    module_class = HydraHeads
    # 6 nodes: the fastest tree on the 2-core CPU (24 verify too many rows; docs/performance.md)
    nodes: int = tree_size(6)

    @classmethod
    def new_module(cls, model, settings: dict[str, Any]) -> HydraHeads:
        module = super().new_module(model, settings)
        module.embed_weight = model.embed.weight.detach().float()  # frozen: the heads read the path's tokens
        return module

    @staticmethod
    def head_logits(module: HydraHeads, model, hidden: torch.Tensor, following: torch.Tensor) -> torch.Tensor:
        """Training and evaluation, teacher-forced: each head reads the true tokens before its own."""
        embeds = module.embed_weight[following.clamp_min(0)]  # [B, heads + 1, hidden]; -1 rows are ignored
        features = [module.head(d, hidden, embeds[:, :d]) for d in range(1, len(module.inputs) + 1)]
        return torch.stack(features, dim=1) @ module.head_weight.T

    def draft(self, state: DecodeState) -> list[int]:
        model = state.model
        h = final_norm(model, state.hidden[-1:])
        token: dict[tuple[int, ...], int] = {}
        for depth in range(1, len(self.paths[-1]) + 1):  # paths are sorted by depth
            level = [p for p in self.paths if len(p) == depth]
            parents = sorted({p[:-1] for p in level})  # nodes whose head runs now; () is the pending token
            ids = torch.tensor([[state.pending] + [token[parent[:j]] for j in range(1, depth)] for parent in parents],
                               device=model.device)
            embeds = model.embed(ids).float()  # [R, depth, hidden]
            features = self.trained.head(depth, h.expand(len(parents), -1), embeds)
            ranked = self.guesses(model, features)
            row = {parent: i for i, parent in enumerate(parents)}
            for p in level:
                token[p] = ranked[row[p[:-1]]][p[-1]]
        return [token[p] for p in self.paths]
