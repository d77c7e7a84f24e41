"""Parallel prompt decoding (PPD): trained prompt tokens ride along in the verification forward and guess ahead.

Paper: Chen et al., "Hardware-Aware Parallel Prompt Decoding for Memory-Efficient Acceleration of LLM
Inference", arXiv 2405.18628. `m` prompt tokens, whose input embeddings are the only trained parameters (the
target is frozen), are appended after a token: prompt token j (0-based) sits at the position j + 1 past it,
attends to the context, the token and the prompt tokens before it, and its output guesses the token j + 2
places on, the one after the target's own next token. Each step the target verifies a candidate tree built
from the top-k guesses of the prompt tokens of the step before (Medusa's tree of rank paths, shaped by the
prompt tokens' measured held-out acceptance, `draft_heads.tree_paths`), and in the same forward new prompt
tokens hang from the root and from the tree's nodes most likely to end the accepted path (the paper's
sparse tree: prompt tokens only where they are likely to be used); they are the tree's aux block, never
candidates and never cached. After verification the guesses of the accepted path's last node are read (or,
when it carried none, those of its deepest ancestor that did, shifted by the tokens accepted since).
Verification is the engine's exact matching walk: the output is plain decoding's, sampled or greedy.
Training: `workbench train ppd` (workbench/training/ppd.py).

Left out: the ensemble of several prompt tokens per position (one embedding per position here), the
paper's hardware-aware search of the tree size (`nodes` and `prompted` are parameters, defaults measured on
the 2-core CPU, docs/performance.md), prompt tokens in the prefill (the first step drafts nothing), and
distillation from the target's full distribution (the prompt tokens learn its chosen tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from workbench.decoding.base import ROOT, AuxBlock, DecodeState, Drafter, DraftTree
from workbench.decoding.draft_heads import load_trained, tree_paths, tree_size
from workbench.registry import param, register


class PromptTokens(nn.Module):
    """The trained input embeddings of `count` prompt tokens: [count, hidden]."""

    def __init__(self, hidden: int, count: int):
        super().__init__()
        self.embeds = nn.Parameter(torch.zeros(count, hidden))


@dataclass
class Shape:
    """The candidate tree for guesses shifted by `shift` slots: its rank paths, parents, the nodes that carry
    prompt tokens, and the top-k each slot must give."""

    paths: list[tuple[int, ...]]
    parents: list[int]
    prompted: list[int]  # node indices (ROOT first) that carry prompt tokens
    width: int


def tree_shape(acc: list[list[float]], nodes: int, prompted: int) -> Shape:
    """The `nodes` rank paths of highest expected acceptance over slots `acc`, and the root plus the `prompted`
    nodes most likely to be the accepted path's last node (P(node accepted) - P(one of its children is))."""
    paths = tree_paths(acc, nodes) if acc else []
    index = {p: i for i, p in enumerate(paths)}
    parents = [index[p[:-1]] if len(p) > 1 else ROOT for p in paths]
    reach = [math.prod(acc[j][i] for j, i in enumerate(p)) for p in paths]
    ends = {ROOT: 1.0 - sum(r for p, r in zip(paths, reach) if len(p) == 1)}
    for i, r in enumerate(reach):
        ends[i] = r - sum(reach[c] for c, parent in enumerate(parents) if parent == i)
    chosen = sorted((i for i in range(len(paths))), key=lambda i: -ends[i])[:prompted]
    width = 1 + max((max(p) for p in paths), default=0)
    return Shape(paths, parents, [ROOT, *sorted(chosen)], width)


@register("decoding", "ppd", lossless=True)
@dataclass
class ParallelPromptDecoding(Drafter):
    """Trained prompt tokens (`workbench train ppd`) guess the next tokens in the verification forward itself."""

    kind: ClassVar[str] = "ppd"
    # Needs a checkpoint trained for the model: the registry-wide matrices leave it to tests/test_ppd.py.
    needs_training: ClassVar[bool] = True
    tokens: int = param(3, "number of trained prompt tokens (tokens guessed past the target's own); must match "
                        "a checkpoint", min=1, max=5)
    nodes: int = tree_size(6)
    prompted: int = param(1, "tree nodes that carry prompt tokens besides the root (the likeliest ends of the "
                          "accepted path)", min=0, max=32)
    trained: Any = field(init=False, default=None, repr=False)
    shapes: list[Shape] = field(init=False, default_factory=list)  # by shift
    _guesses: list[list[int]] | None = field(init=False, default=None, repr=False)  # [slots, width] from the host
    _shift: int = field(init=False, default=0)  # slots of the host's guesses already past
    _shape: Shape | None = field(init=False, default=None, repr=False)  # the tree proposed this step

    def check(self) -> None:
        from workbench.engine import DRAFT_HEADROOM  # the engine imports the drafters

        rows = 1 + self.nodes + self.tokens * (1 + self.prompted)
        if rows > DRAFT_HEADROOM:
            raise ValueError(f"a step would run {rows} rows (1 + nodes + tokens x (1 + prompted)); at most "
                             f"{DRAFT_HEADROOM} fit, so lower nodes, tokens or prompted")

    def settings(self) -> dict[str, Any]:
        """What a checkpoint depends on."""
        return {"tokens": self.tokens}

    def begin(self, state: DecodeState) -> None:
        self.trained, acc = load_trained(state, self.kind, self.settings(),
                                         lambda s: PromptTokens(state.model.config.hidden_size, s["tokens"]))
        self.shapes = [tree_shape(acc[shift:], self.nodes, self.prompted) for shift in range(self.tokens)]
        self._guesses, self._shift = None, 0

    def propose(self, state: DecodeState) -> DraftTree:
        if self._guesses is None or self._shift >= self.tokens:  # nothing to guess from: prompt tokens only
            shape = Shape([], [], [ROOT], 1)
            tokens: list[int] = []
        else:
            shape = self.shapes[self._shift]
            slots = self._guesses[self._shift:]
            tokens = [slots[len(p) - 1][p[-1]] for p in shape.paths]
        self._shape = shape
        block = self._prompt_block(state, DraftTree(tokens, list(shape.parents)), shape.prompted)
        return DraftTree(tokens, list(shape.parents), aux=block)

    def _prompt_block(self, state: DecodeState, tree: DraftTree, hosts: list[int]) -> AuxBlock:
        """`tokens` prompt tokens after each host node: group g, token j at the host's offset + j + 1, seeing
        what the host sees, the host, and the group's tokens up to itself."""
        m, n = self.tokens, len(tree)
        seen = tree.attention_mask()  # [1 + n, 1 + n]
        depths = [0, *tree.depths()]
        mask = torch.zeros(m * len(hosts), 1 + n + m * len(hosts), dtype=torch.bool)
        offsets = []
        for g, host in enumerate(hosts):
            for j in range(m):
                row = g * m + j
                mask[row, : 1 + n] = seen[host + 1]
                mask[row, 1 + n + g * m: 1 + n + row + 1] = True
                offsets.append(depths[host + 1] + j + 1)
        embeds = self.trained.embeds.detach().repeat(len(hosts), 1).to(state.model.device)
        return AuxBlock([0] * len(mask), offsets, mask, embeds)

    def observe(self, state, tree, acceptance, logits) -> None:
        """Keep the guesses of the deepest accepted node that carried prompt tokens."""
        shape = self._shape
        path = [ROOT, *acceptance.accepted]
        host = next(node for node in reversed(path) if node in shape.prompted)
        group = shape.prompted.index(host)
        rows = 1 + len(tree) + group * self.tokens + torch.arange(self.tokens, device=logits.device)
        width = max(s.width for s in self.shapes)
        self._guesses = logits[rows].topk(width, dim=-1).indices.tolist()
        self._shift = len(path) - 1 - path.index(host)
