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

A second addition (`pairs`, on by default): each verified row's candidates are also kept under the pair (the
token before, the token), and a node whose pair was seen drafts from the pair's candidates, else from the
matrix's row. Two tokens of context predict the next far better where text repeats; over the prompt suite the
tokens per forward rose from 1.53 to 1.61 (docs/performance.md). With `prompt` too, the prefill's rows cover
every prompt position instead of the distinct tokens. The pairs' table keeps the MAX_PAIRS most recently
updated pairs, and `hot_start` keeps it across runs with M. `pairs=false,prompt=false` is the paper's method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice

import torch

from workbench.decoding.base import ROOT, Drafter, DraftTree
from workbench.registry import param, register
from workbench.sampling import top_k

EMPTY = -1
PROMPT_CHUNK = 256  # prompt rows per LM-head call when recycling the prompt's candidates
MAX_PAIRS = 1 << 17  # pairs of tokens whose candidates are kept (about 64 MB at k = 8; the suite makes ~50k)


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
                         "over the prompt's distinct tokens, or over every position with pairs)")
    pairs: bool = param(True, "also keep each pair of tokens' newest candidates, and draft from the pair's where "
                        "that pair was seen (an addition to the paper)")
    _template: list[tuple[int, int]] = field(init=False, default_factory=list)
    _matrix: torch.Tensor | None = field(init=False, default=None, repr=False)  # [vocab, k] int64
    _pairs: dict | None = field(init=False, default=None, repr=False)  # (token before, token) -> k candidates
    _before_root: int = field(init=False, default=EMPTY)  # the token before this step's pending token

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
            self._pairs = state.memory.setdefault("token_recycling:pairs", {}) if self.pairs else None
        else:
            self._matrix = torch.full(shape, EMPTY, dtype=torch.long)
            self._pairs = {} if self.pairs else None

    def wants_prompt_states(self) -> bool:
        return self.prompt

    def observe_prompt(self, state, hidden) -> None:
        # each prompt token's row from its last occurrence, as if the prompt had been decoded in order (with
        # pairs, every position's row also goes to its pair); the LM head a chunk of rows at a time, so a long
        # prompt never holds [prompt, vocab] logits
        ids = state.prompt_ids
        last = {token: i for i, token in enumerate(ids)}
        positions = set(last.values())
        if self._pairs is not None:
            positions |= {i for i in range(1, len(ids))}
        positions = sorted(positions)
        for start in range(0, len(positions), PROMPT_CHUNK):
            chunk = positions[start:start + PROMPT_CHUNK]
            top = top_k(state.model.logits(hidden[torch.tensor(chunk, device=hidden.device)]), self.k)[1].cpu()
            unigram = [j for j, i in enumerate(chunk) if last[ids[i]] == i]
            self._matrix[torch.tensor([ids[chunk[j]] for j in unigram], dtype=torch.long)] = top[unigram]
            if self._pairs is not None:
                after_first = [(j, i) for j, i in enumerate(chunk) if i]  # position 0 has no token before it
                candidates = top.tolist()
                self._remember_pairs([(ids[i - 1], ids[i]) for _, i in after_first],
                                     [candidates[j] for j, _ in after_first])

    def propose(self, state) -> DraftTree:
        tokens: list[int] = []
        parents: list[int] = []
        placed: dict[int, int] = {}  # template index -> node index in the tree
        rows: dict[tuple[int, int], list[int]] = {}  # (token before, token) -> candidates, read once per step
        generated = state.generated
        self._before_root = generated[-2] if len(generated) > 1 else state.prompt_ids[-1]
        for index, (parent, rank) in enumerate(self._template):
            if parent == ROOT:
                parent_token, parent_node, before = state.pending, ROOT, self._before_root
            elif parent in placed:
                parent_node = placed[parent]
                parent_token = tokens[parent_node]
                grandparent = parents[parent_node]
                before = state.pending if grandparent == ROOT else tokens[grandparent]
            else:
                continue  # the parent was not drafted, so neither is its subtree
            key = (before, parent_token)
            if key not in rows:
                pair = self._pairs.get(key) if self._pairs is not None else None
                rows[key] = pair if pair is not None else self._matrix[parent_token].tolist()
            candidate = rows[key][rank]
            if candidate != EMPTY:
                placed[index] = len(tokens)
                tokens.append(candidate)
                parents.append(parent_node)
        return DraftTree(tokens, parents)

    def observe(self, state, tree, acceptance, logits) -> None:
        # Recycle: every token that went through the target gets its newest top-k successors.
        inputs = [tree.root, *tree.tokens]
        top = top_k(logits, self.k)[1].cpu()
        self._matrix[torch.tensor(inputs)] = top
        if self._pairs is not None:
            befores = [self._before_root] + [tree.root if p == ROOT else tree.tokens[p] for p in tree.parents]
            self._remember_pairs(list(zip(befores, inputs)), top.tolist())

    def _remember_pairs(self, keys: list[tuple[int, int]], rows: list[list[int]]) -> None:
        """Each pair's newest candidates, as tuples (ints in tuples cost the garbage collector nothing once
        seen); past MAX_PAIRS pairs, the least recently updated go."""
        pairs = self._pairs
        for key, row in zip(keys, rows):
            pairs.pop(key, None)  # re-inserted last: the dict's order is the order of updates
            pairs[key] = tuple(row)
        for key in list(islice(pairs, max(0, len(pairs) - MAX_PAIRS))):
            del pairs[key]
