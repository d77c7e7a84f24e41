"""Token Recycling: draft trees from the candidate tokens that earlier verifications threw away.

Paper: Luo et al., "Turning Trash into Treasure: Accelerating Inference of Large Language Models with
Token Recycling" (arXiv 2408.08696). Every verification computes a full distribution for every token it
runs; the top-k tokens of each are kept in an adjacency matrix M[token] -> k likely next tokens, updated
online (the newest verification of a token overwrites its row). To draft, a tree of fixed shape is
filled from the pending token: the child of rank r under a node holding token t is
M[t][r]. The target verifies the whole tree in one forward; matching keeps the output exactly plain
decoding's.

The tree shape is imbalanced as in the paper: `widths[d]` is how many children the first-ranked node at
depth d gets, and a node of rank r gets `widths[d] - r` (at least none). The default (2-1-1-1: five nodes,
depth 4) is sized for CPUs, where each verified node costs compute: over the whole prompt suite it ran 1.14x
plain decoding against 1.07x for 4-2-2-1-1 (18 nodes) and 3-2-1-1 (10), docs/performance.md; the paper's GPU
tree has about 80 nodes. With `hot_start` (the
paper's default) M is kept across the runs of a loaded model, so a new run drafts from the first step
(its draft trees, not its output, then depend on the runs before it); without it M starts empty.

An addition to the paper (`prompt`, on by default): the prefill's forward also yields a distribution after
every prompt token, which plain prefill throws away; here each prompt token's row takes its top-k. Text that
copies from the prompt (summaries, edits, retrieved passages) then drafts from the first step. Over the
prompt suite it raised the tokens per forward from 1.39 to 1.52 (docs/performance.md), for the LM head over
the prompt's distinct tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.decoding.base import ROOT, Drafter, DraftTree
from workbench.registry import param, register
from workbench.sampling import top_k

EMPTY = -1
PROMPT_CHUNK = 256  # prompt rows per LM-head call when recycling the prompt's candidates


def tree_template(widths: list[int]) -> list[tuple[int, int]]:
    """(parent template index or ROOT, rank) for every node of the imbalanced tree, depth first with the
    first-ranked child first: the chain of first-ranked candidates, the path most often accepted, then fills
    consecutive cache slots, and committing it moves no cache data."""
    nodes: list[tuple[int, int]] = []

    def grow(parent: int, rank: int, depth: int) -> None:
        if depth == len(widths):
            return
        for child_rank in range(max(0, widths[depth] - rank)):
            nodes.append((parent, child_rank))
            grow(len(nodes) - 1, child_rank, depth + 1)

    grow(ROOT, 0, 0)  # the root has rank 0
    return nodes


@register("decoding", "token_recycling", lossless=True)
@dataclass
class TokenRecycling(Drafter):
    """Draft a fixed-shape tree from an online adjacency matrix of each token's recent top-k successors."""

    widths: str = param("2-1-1-1", "children of the first-ranked node at each depth, dash-separated (the "
                        "paper's GPU trees are far wider)")
    k: int = param(8, "candidates kept per token in the adjacency matrix", min=1, max=64)
    hot_start: bool = param(True, "keep the matrix across runs of the same model (the paper's hot start)")
    prompt: bool = param(True, "also recycle the prefill's candidates for every prompt token (costs the LM head "
                         "over the prompt's distinct tokens)")
    _template: list[tuple[int, int]] = field(init=False, default_factory=list)
    _matrix: torch.Tensor | None = field(init=False, default=None, repr=False)  # [vocab, k] int64

    def check(self) -> None:
        try:
            widths = [int(w) for w in self.widths.split("-")]
        except ValueError:
            raise ValueError(f"widths must be dash-separated integers, got {self.widths!r}") from None
        if not widths or min(widths) < 1 or max(widths) > self.k:
            raise ValueError(f"widths must be between 1 and k={self.k}, got {self.widths!r}")

    def begin(self, state) -> None:
        self._template = tree_template([int(w) for w in self.widths.split("-")])
        shape = (state.model.config.vocab_size, self.k)
        if self.hot_start:
            kept = state.memory.get("token_recycling")
            if kept is None or kept.shape != shape:
                kept = state.memory["token_recycling"] = torch.full(shape, EMPTY, dtype=torch.long)
            self._matrix = kept
        else:
            self._matrix = torch.full(shape, EMPTY, dtype=torch.long)

    def wants_prompt_states(self) -> bool:
        return self.prompt

    def observe_prompt(self, state, hidden) -> None:
        # each prompt token's row from its last occurrence, as if the prompt had been decoded in order; the LM
        # head a chunk of rows at a time, so a long prompt never holds [prompt, vocab] logits
        last = {token: i for i, token in enumerate(state.prompt_ids)}
        tokens, rows = torch.tensor(list(last)), torch.tensor(list(last.values()), device=hidden.device)
        for start in range(0, len(rows), PROMPT_CHUNK):
            chunk = slice(start, start + PROMPT_CHUNK)
            logits = state.model.logits(hidden[rows[chunk]])
            self._matrix[tokens[chunk]] = top_k(logits, self.k)[1].cpu()

    def propose(self, state) -> DraftTree:
        tokens: list[int] = []
        parents: list[int] = []
        placed: dict[int, int] = {}  # template index -> node index in the tree
        rows: dict[int, list[int]] = {}  # token -> its matrix row, read once per step
        for index, (parent, rank) in enumerate(self._template):
            if parent == ROOT:
                parent_token, parent_node = state.pending, ROOT
            elif parent in placed:
                parent_node = placed[parent]
                parent_token = tokens[parent_node]
            else:
                continue  # the parent was not drafted, so neither is its subtree
            if parent_token not in rows:
                rows[parent_token] = self._matrix[parent_token].tolist()
            candidate = rows[parent_token][rank]
            if candidate != EMPTY:
                placed[index] = len(tokens)
                tokens.append(candidate)
                parents.append(parent_node)
        return DraftTree(tokens, parents)

    def observe(self, state, tree, acceptance, logits) -> None:
        # Recycle: every token that went through the target gets its newest top-k successors.
        inputs = torch.tensor([tree.root, *tree.tokens])
        self._matrix[inputs] = top_k(logits, self.k)[1].cpu()
