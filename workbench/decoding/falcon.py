"""Falcon: a semi-autoregressive drafter that writes k tokens per pass, trained with glancing distillation.

Paper: Gao et al., "Falcon: Faster and Parallel Inference of Large Language Models through Enhanced
Semi-Autoregressive Drafting and Custom-Designed Decoding Tree", arXiv 2412.12639. A light drafter on the
target's last-layer features drafts a block of k tokens per pass, all k in parallel, and runs again on the
block it wrote (semi-autoregressive: parallel inside a block, sequential between blocks). Here a pass is
f' = f + W_out SiLU(W_in [f; e_1; ...; e_k]) over the running feature f (the target's normed state at the
first pass, the drafter's own output after) and the embeddings of the k tokens before the block (the first
pass has only the pending token; the slot before it is a learned vector); block position j reads
f' + V_j SiLU(U_j f') through the target's LM head. The same weights serve every pass (k = 2, as the paper).

Training (`workbench train falcon`) is coupled sequential glancing distillation on the target's greedy
outputs: the passes are unrolled as at decoding, each reading the feature the previous pass produced
(coupled), and the tokens a pass reads are the drafter's own guesses for the block before, with as many of
them replaced by the target's tokens as a fraction (one half) of the guesses that were wrong (glancing, as
in GLAT), so the drafter learns to continue its own blocks. Evaluation reads the target's tokens.

The decoding tree is Falcon's custom one: one drafter pass per distinct block prefix in the tree, each pass
giving the top-k of all k positions at once, so a node at block position j takes its rank among its block's
j-th guesses whichever sibling path it hangs under. The tree's shape is Medusa's, from measured per-position
acceptance (`draft_heads.tree_paths`); the target verifies it in one forward (lossless matching walk).

Left out: the drafter's attention over the sequence (the paper's drafter is a decoder layer over the whole
feature sequence, with a relaxed causal mask inside a block; this one reads the current feature alone),
glancing of the target's features (only tokens are glanced), and the paper's hand-tuned tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workbench.decoding.base import DecodeState
from workbench.decoding.draft_heads import HeadDrafter, final_norm
from workbench.registry import register

BLOCK = 2  # tokens per pass (the paper's k)
GLANCE = 0.5  # fraction of a block's wrong guesses replaced by the target's tokens in training


class FalconDrafter(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.start = nn.Parameter(torch.zeros(hidden))  # the slot before the pending token, in the first pass
        self.step_in = nn.Linear((BLOCK + 1) * hidden, hidden)
        self.step_out = nn.Linear(hidden, hidden)
        self.position_in = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(BLOCK))
        self.position_out = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(BLOCK))
        for out in [self.step_out, *self.position_out]:  # start as the identity on the features
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)

    def step(self, feature: torch.Tensor, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: feature [B, hidden], embeds [B, BLOCK, hidden] of the tokens before the block -> the new
        feature [B, hidden] and the block's positions' features [B, BLOCK, hidden] for the LM head."""
        x = torch.cat([feature, embeds.flatten(1)], dim=1)
        feature = feature + self.step_out(nn.functional.silu(self.step_in(x)))
        out = [feature + o(nn.functional.silu(i(feature))) for i, o in zip(self.position_in, self.position_out)]
        return feature, torch.stack(out, dim=1)

    def first_embeds(self, pending: torch.Tensor) -> torch.Tensor:
        """[B, hidden] embedding of the pending token -> [B, BLOCK, hidden], the learned slot(s) before it."""
        return torch.cat([self.start.expand(len(pending), BLOCK - 1, -1), pending[:, None]], dim=1)


def glanced(guess: torch.Tensor, truth: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The drafter's guesses [B, BLOCK] with round(GLANCE x wrong guesses) of them, picked at random per row,
    replaced by the target's tokens (and the target's wherever the sequence has ended, where truth is -1)."""
    wrong = (guess != truth) & (truth >= 0)
    reveal = torch.ceil(GLANCE * wrong.sum(1, keepdim=True))  # how many to show, per row
    order = torch.rand(guess.shape, generator=generator).argsort(1).argsort(1)  # a random rank per slot
    show = order < reveal
    return torch.where(show | (truth < 0), truth.clamp_min(0), guess)


@register("decoding", "falcon", lossless=True)
@dataclass
class Falcon(HeadDrafter):
    """Trained Falcon drafter (`workbench train falcon`): 2 tokens per pass, semi-autoregressive, in a tree."""

    kind = "falcon"
    module_class = FalconDrafter

    @classmethod
    def new_module(cls, model, settings: dict[str, Any]) -> FalconDrafter:
        module = super().new_module(model, settings)
        module.embed_weight = model.embed.weight.detach().float()  # frozen: the passes read tokens
        module.glance_generator = torch.Generator().manual_seed(0)
        return module

    @staticmethod
    def head_logits(module: FalconDrafter, model, hidden: torch.Tensor, following: torch.Tensor) -> torch.Tensor:
        """[B, heads, vocab]: the passes unrolled over `following` (the pending token, then the heads' targets).
        In training a pass reads the previous block as glanced guesses; in evaluation the target's tokens."""
        embed = module.embed_weight
        feature, embeds = hidden, module.first_embeds(embed[following[:, 0].clamp_min(0)])
        logits = []
        for first in range(1, module.heads + 1, BLOCK):  # following[:, first] is the block's first target
            feature, out = module.step(feature, embeds)
            block = out @ module.head_weight.T  # [B, BLOCK, vocab]
            logits.append(block)
            truth = following[:, first:first + BLOCK]
            if module.training:
                tokens = glanced(block.argmax(-1)[:, :truth.shape[1]], truth, module.glance_generator)
            else:
                tokens = truth.clamp_min(0)
            if tokens.shape[1] < BLOCK:  # past the sequence's end: nothing further is trained
                break
            embeds = embed[tokens]
        return torch.cat(logits, dim=1)[:, :module.heads]

    def draft(self, state: DecodeState) -> list[int]:
        model = state.model
        depth = len(self.paths[-1])
        # One pass per block prefix (a path cut at a block boundary) with descendants in the tree. feature[q]:
        # what the pass for prefix q produced (before any pass, feature[()] is the target's state).
        feature: dict[tuple[int, ...], torch.Tensor] = {(): final_norm(model, state.hidden[-1:])[0]}
        token: dict[tuple[int, ...], int] = {}
        ranked: dict[tuple[int, ...], list[list[int]]] = {}
        for first in range(0, depth, BLOCK):
            prefixes = sorted({p[:first] for p in self.paths if len(p) > first})
            if first == 0:
                embeds = self.trained.first_embeds(model.embed(torch.tensor([state.pending], device=model.device))
                                                   .float())
            else:
                ids = [[token[p[:j]] for j in range(first - BLOCK + 1, first + 1)] for p in prefixes]
                embeds = model.embed(torch.tensor(ids, device=model.device)).float()
            features = torch.stack([feature[p[:first - BLOCK] if first else ()] for p in prefixes])
            new, out = self.trained.step(features, embeds)  # [R, hidden], [R, BLOCK, hidden]
            top = self.guesses(model, out)
            for row, p in enumerate(prefixes):
                feature[p] = new[row]
                ranked[p] = top[row]
            for p in self.paths:
                if first < len(p) <= first + BLOCK:
                    token[p] = ranked[p[:first]][len(p) - first - 1][p[-1]]
        return [token[p] for p in self.paths]

