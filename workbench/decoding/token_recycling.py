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
depth 4) is sized for CPUs, where each verified node costs compute; `widths=paper` is the paper's static tree
(80 nodes over 6 levels, PAPER_TREE). M starts empty for every run by default, so a run depends only on its
spec, prompt and seed. `hot_start=true` (the paper's setting) keeps M across the runs of a loaded model, so a
new run drafts from the first step; its draft trees and speed, not its output, then depend on the runs before
it, and its trace records `warm_start`.

An addition to the paper (`prompt`, on by default): the prefill's forward also yields a distribution after
every prompt token, which plain prefill throws away; here each prompt token's row takes its top-k. Text that
copies from the prompt (summaries, edits, retrieved passages) then drafts from the first step, for the LM
head over the prompt's distinct tokens.

A second addition (`context`, 2 by default): each verified row's candidates are also kept under the last
2..`context` tokens ending at its token, and a node drafts from the candidates of the longest such run of
tokens that has been seen, else from M's row. Two tokens of context predict the next better where text
repeats. With `prompt` too, the prefill's rows cover every prompt position instead of the distinct tokens.
The table keeps the MAX_CONTEXTS most recently updated runs, and `hot_start` keeps it across runs with M.

The paper's method is one parameter away: `preset=paper` sets `context=1,prompt=false,widths=paper` (M alone,
no prompt candidates, the paper's tree); `preset=extended`, the default, keeps the additions and the CPU-sized
tree (docs/decoding.md measures the two). Neither sets `hot_start`: add `hot_start=true` for the paper's warm
matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, ClassVar

import torch

from workbench.decoding.base import ROOT, Drafter, DraftTree
from workbench.decoding.specmemo import MemoryBudget
from workbench.registry import param, register
from workbench.sampling import top_k

EMPTY = -1
PROMPT_CHUNK = 256  # prompt rows per LM-head call when recycling the prompt's candidates
MAX_CONTEXTS = 1 << 17  # runs of tokens whose candidates are kept (about 64 MB at k = 8; the suite makes ~50k pairs)


# The paper's static tree, level by level: how many children each node of the level above gets, nodes in
# breadth-first order with each parent's children by rank (80 nodes over 6 levels).
PAPER_TREE = (
    (8,),
    (8, 4, 3, 2, 1, 1, 1, 1),
    (8, 3, 2, 1, 1, 1, 1, 1, 2, 1, 0, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0),
    (5, 2, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 0),
    (3, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 1, 0, 0),
    (2, 0, 0, 1, 0, 0, 0, 0),
)
# What a preset sets; the registry refuses a spec that also gives one of these another value.
PRESETS = {"extended": {}, "paper": {"widths": "paper", "context": 1, "prompt": False}}


def tree_template(widths: list[int]) -> list[tuple[int, int]]:
    """(parent template index or ROOT, rank) for every node of the imbalanced tree, depth first with the
    first-ranked child first: the chain of first-ranked candidates, the path most often accepted, then fills
    consecutive cache slots, and committing it moves no cache data."""
    def children(path: tuple[int, ...]) -> int:  # path: the ranks from the root's child down to the node
        depth, rank = len(path), path[-1] if path else 0  # the root has rank 0
        return max(0, widths[depth] - rank) if depth < len(widths) else 0

    return _depth_first(children)


def layered_template(levels: tuple[tuple[int, ...], ...]) -> list[tuple[int, int]]:
    """`tree_template` for a tree given level by level (as PAPER_TREE), in the same depth-first order."""
    counts: dict[tuple[int, ...], int] = {}  # path of ranks -> how many children the node there has
    frontier: list[tuple[int, ...]] = [()]
    for level in levels:
        if len(level) != len(frontier):
            raise ValueError(f"a level of {len(level)} counts under {len(frontier)} nodes")
        counts.update(zip(frontier, level))
        frontier = [path + (rank,) for path in frontier for rank in range(counts[path])]
    return _depth_first(lambda path: counts.get(path, 0))


def _depth_first(children: Callable[[tuple[int, ...]], int]) -> list[tuple[int, int]]:
    nodes: list[tuple[int, int]] = []

    def grow(parent: int, path: tuple[int, ...]) -> None:
        for rank in range(children(path)):
            nodes.append((parent, rank))
            grow(len(nodes) - 1, path + (rank,))

    grow(ROOT, ())
    return nodes


@register("decoding", "token_recycling", lossless=True)
@dataclass
class TokenRecycling(MemoryBudget, Drafter):
    """Draft a fixed-shape tree from an online adjacency matrix of each token's recent top-k successors."""

    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    preset: str = param("extended", "paper: the paper's method (sets context=1, prompt=false, widths=paper); "
                        "extended: the additions below and the CPU-sized tree", choices=tuple(PRESETS))
    widths: str = param("2-1-1-1", "children of the first-ranked node at each depth, dash-separated; paper: the "
                        "paper's static tree (80 nodes, 6 levels)")
    k: int = param(8, "candidates kept per token in the adjacency matrix", min=1, max=64)
    hot_start: bool = param(False, "keep the matrix across runs of the same model (the paper's hot start; opt-in, "
                            "since a run's speed then depends on the runs before it)")
    prompt: bool = param(True, "also recycle the prefill's candidates for every prompt token (costs the LM head "
                         "over the prompt's distinct tokens, or over every position with context > 1; an addition)")
    context: int = param(2, "tokens that key the candidates: 1 is the paper's matrix alone; n also keeps the newest "
                         "candidates of every run of 2..n tokens and drafts from the longest seen (an addition)",
                         min=1, max=4)
    _template: list[tuple[int, int]] = field(init=False, default_factory=list)
    _matrix: torch.Tensor | None = field(init=False, default=None, repr=False)  # [vocab, k] int64
    _contexts: dict | None = field(init=False, default=None, repr=False)  # run of 2+ tokens -> k candidates
    _root_tail: tuple[int, ...] = field(init=False, default=())  # the last `context` tokens, up to the pending one

    def __post_init__(self) -> None:
        for name, value in self.presets[self.preset].items():
            setattr(self, name, value)

    def check(self) -> None:
        if self.widths == "paper":
            widths = [max(level) for level in PAPER_TREE]
        else:
            try:
                widths = [int(w) for w in self.widths.split("-")]
            except ValueError:
                raise ValueError(f"widths must be dash-separated integers or paper, got {self.widths!r}") from None
        if not widths or min(widths) < 1 or max(widths) > self.k:
            raise ValueError(f"widths must be between 1 and k={self.k}, got {self.widths!r}"
                             + (f" (its widest node has {max(widths)} children)" if self.widths == "paper" else ""))

    def begin(self, state) -> None:
        self._template = (layered_template(PAPER_TREE) if self.widths == "paper"
                          else tree_template([int(w) for w in self.widths.split("-")]))
        shape = (state.model.config.vocab_size, self.k)
        if self.hot_start:
            kept = state.memory.get("token_recycling")
            if kept is None or kept.shape != shape:  # a new model or another k: both tables start again
                kept = state.memory["token_recycling"] = torch.full(shape, EMPTY, dtype=torch.long)
                state.memory["token_recycling:contexts"] = {}
            self.warm_started = bool((kept[:, 0] != EMPTY).any())
            self._matrix = kept
            self._contexts = state.memory.setdefault("token_recycling:contexts", {}) if self.context > 1 else None
        else:
            self._matrix = torch.full(shape, EMPTY, dtype=torch.long)
            self._contexts = {} if self.context > 1 else None

    def wants_prompt_states(self) -> bool:
        return self.prompt

    def observe_prompt(self, state, hidden) -> None:
        # each prompt token's row from its last occurrence, as if the prompt had been decoded in order (with
        # context, every position's row also goes to the runs of tokens ending there); the LM head a chunk of rows
        # at a time, so a long prompt never holds [prompt, vocab] logits
        ids = state.prompt_ids
        last = {token: i for i, token in enumerate(ids)}
        positions = set(last.values())
        if self._contexts is not None:
            positions |= {i for i in range(1, len(ids))}
        positions = sorted(positions)
        for start in range(0, len(positions), PROMPT_CHUNK):
            chunk = positions[start:start + PROMPT_CHUNK]
            top = top_k(state.model.logits(hidden[torch.tensor(chunk, device=hidden.device)]), self.k)[1].cpu()
            unigram = [j for j, i in enumerate(chunk) if last[ids[i]] == i]
            self._matrix[torch.tensor([ids[chunk[j]] for j in unigram], dtype=torch.long)] = top[unigram]
            if self._contexts is not None:
                self._remember([tuple(ids[max(0, i + 1 - self.context): i + 1]) for i in chunk], top.tolist())

    def propose(self, state) -> DraftTree:
        tokens: list[int] = []
        parents: list[int] = []
        placed: dict[int, int] = {}  # template index -> node index in the tree
        tails: list[tuple[int, ...]] = []  # per node: the last `context` tokens up to it
        rows: dict[tuple[int, ...], list[int]] = {}  # tail -> candidates, read once per step
        recent = state.generated[-self.context:]
        self._root_tail = tuple(state.prompt_ids[max(0, len(state.prompt_ids) - self.context + len(recent)):] + recent)
        for index, (parent, rank) in enumerate(self._template):
            if parent == ROOT:
                parent_node, tail = ROOT, self._root_tail
            elif parent in placed:
                parent_node = placed[parent]
                tail = tails[parent_node]
            else:
                continue  # the parent was not drafted, so neither is its subtree
            if tail not in rows:
                rows[tail] = self._candidates(tail)
            candidate = rows[tail][rank]
            if candidate != EMPTY:
                placed[index] = len(tokens)
                tokens.append(candidate)
                parents.append(parent_node)
                tails.append((tail + (candidate,))[-self.context:])
        return DraftTree(tokens, parents)

    def _candidates(self, tail: tuple[int, ...]) -> list[int]:
        """The candidates after `tail`: those of its longest ending run of 2+ tokens seen, else M's row."""
        if self._contexts is not None:
            for n in range(len(tail), 1, -1):
                found = self._contexts.get(tail[-n:])
                if found is not None:
                    return found
        return self._matrix[tail[-1]].tolist()

    def observe(self, state, tree, acceptance, logits) -> None:
        # Recycle: every token that went through the target gets its newest top-k successors.
        inputs = [tree.root, *tree.tokens]
        top = top_k(logits, self.k)[1].cpu()
        self._matrix[torch.tensor(inputs)] = top
        if self._contexts is not None:
            tails = [self._root_tail]
            for token, parent in zip(tree.tokens, tree.parents):
                tails.append((tails[parent + 1] + (token,))[-self.context:])  # row parent + 1 is the parent's
            self._remember(tails, top.tolist())

    def _remember(self, tails: list[tuple[int, ...]], rows: list[list[int]]) -> None:
        """Each row's candidates under every run of 2+ tokens ending its tail, as tuples (ints in tuples cost the
        garbage collector nothing once seen); past MAX_CONTEXTS runs, the least recently updated go."""
        table = self._contexts
        for tail, row in zip(tails, rows):
            row = tuple(row)
            for n in range(2, len(tail) + 1):
                key = tail[-n:]
                table.pop(key, None)  # re-inserted last: the dict's order is the order of updates
                table[key] = row
        for key in list(islice(table, max(0, len(table) - MAX_CONTEXTS))):
            del table[key]
