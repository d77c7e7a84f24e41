"""Lookahead decoding: Jacobi iteration over a 2D window feeds an n-gram pool; pool n-grams are verified.

Papers: Fu et al., "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding" (arXiv
2402.02057); Teng et al., "Accelerating Auto-regressive Text-to-Image Generation with Training-free
Speculative Jacobi Decoding" (SJD, arXiv 2410.01699) for sampling.

Each step runs one target forward over two branches [arXiv 2402.02057, sec. 3]. The lookahead branch is a
window of W columns and N - 1 levels, one level per past Jacobi iteration: level 0 holds the guesses for
the W - 1 positions after the pending token (column 0 is the pending token itself), level l column c sits
at position pending + l + c and attends to level 0's columns 0..c and to column c of levels 1..l (the
paper's fig. 2b mask), so each column is a diagonal trajectory. The rows of the top level are a new Jacobi
iteration: they become the new top level, and each column's trajectory (level 0 .. top, new token) is an
N-gram for the pool (key: its first token; up to G n-grams per key, least recently seen dropped first).
The verification branch is a trie of the pool's n-grams whose key is the pending token. The window then
slides by one position, whatever was accepted (the reference implementation's ALWAYS_FWD_ONE): level 0
takes level 1's tokens. The first N - 2 steps fill the levels (warm-up), starting from prompt tokens.

Here level 0 is verified too: it is a chain after the pending token with exactly the tree mask, so it goes
in the draft tree for free (Jacobi decoding's own check), and levels 1..N-2 ride along as the tree's aux
block (never candidates, never committed). Under sampling the window's tokens are drawn from the target's
processed distribution at their iteration, and level 0 follows SJD instead of taking level 1's tokens:
each step it is redrawn, fresh, from the rows that predict its positions after the tokens just committed
(its own rows first, as in SJD's Jacobi update), recording the distribution q each token was drawn from,
and the `speculative` acceptor verifies it with min(1, p/q) and residual resampling, first among the
root's children. A token that has already influenced a verified step is no longer distributed as its q,
so pool n-grams (made of such tokens) are verified as deterministic drafts, with one-hot q: exactly
lossless, but they then accept only where they agree with a target draw. Under greedy decoding everything
reduces to matching. Left out: the reference's multi-GPU sharding of the window and its FlashAttention
layout, and SJD's image-specific initialisation. `prompt_pool` (the reference's POOL_FROM_PROMPT) also
seeds the pool with the prompt's and the output's own n-grams.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.decoding.base import ROOT, AuxBlock, Drafter, DraftTree
from workbench.registry import param, register
from workbench.sampling import argmax_rows


@register("decoding", "lookahead", lossless=True)
@dataclass
class Lookahead(Drafter):
    """Jacobi iteration over a W x (N-1) window fills an n-gram pool; up to G pool n-grams are verified."""

    default_acceptor = "speculative"  # SJD's min(1, p/q) for level 0 under sampling; matching under greedy

    window: int = param(5, "W: columns of the Jacobi window", min=2, max=32)
    ngram: int = param(4, "N: n-gram size; the window keeps N - 1 levels", min=3, max=8)
    candidates: int = param(4, "G: n-grams kept per key in the pool, and verified per step", min=1, max=32)
    prompt_pool: bool = param(True, "also put the prompt's and the output's own n-grams in the pool")
    # level 0: guesses after the pending token (W - 1 + e of them); level l >= 1: W + e columns, where
    # e = N - 2 - filled counts the warm-up steps left (every level loses its first column per warm-up step)
    _levels: list[list[int]] = field(init=False, default_factory=list)
    _q0: torch.Tensor | None = field(init=False, default=None, repr=False)  # [len(level 0), vocab] or None
    _pool: dict[int, list[tuple[int, ...]]] = field(init=False, default_factory=dict)  # key -> n-gram tails
    _indexed: int = field(init=False, default=0)  # state.tokens[:_indexed] are in the pool (prompt_pool)
    _generator: torch.Generator | None = field(init=False, default=None, repr=False)

    def begin(self, state) -> None:
        self._generator = torch.Generator(device=state.model.device).manual_seed(state.sampler.seed + 1)
        # The reference starts level 0 with random copies of prompt tokens, long enough for the warm-up.
        prompt = state.prompt_ids
        picks = torch.randint(len(prompt), (self.window + self.ngram - 3,), generator=self._generator,
                              device=self._generator.device)
        self._levels = [[prompt[i] for i in picks.tolist()]]
        self._q0, self._pool, self._indexed = None, {}, 0
        if self.prompt_pool:
            self._index_committed(state.tokens)

    @property
    def _filled(self) -> int:
        return len(self._levels) - 1

    def _add(self, key: int, tail: tuple[int, ...]) -> None:
        grams = self._pool.setdefault(key, [])
        if tail in grams:
            grams.remove(tail)
        elif len(grams) >= self.candidates:
            grams.pop(0)
        grams.append(tail)

    def _index_committed(self, tokens: list[int]) -> None:
        for end in range(max(self._indexed, self.ngram), len(tokens) + 1):
            self._add(tokens[end - self.ngram], tuple(tokens[end - self.ngram + 1: end]))
        self._indexed = len(tokens)

    def propose(self, state) -> DraftTree:
        level0 = self._levels[0]
        tokens = list(level0)
        parents = list(range(-1, len(level0) - 1))
        kids: dict[int, dict[int, int]] = {ROOT: {level0[0]: 0}} | {i: {t: i + 1} for i, t in enumerate(level0[1:])}
        kids[len(level0) - 1] = {}
        for tail in reversed(self._pool.get(state.pending, [])):  # most recently seen first
            parent = ROOT
            for token in tail:
                node = kids[parent].get(token)
                if node is None:
                    node = kids[parent][token] = len(tokens)
                    kids[node] = {}
                    tokens.append(token)
                    parents.append(parent)
                parent = node
        return DraftTree(tokens, parents, self._draft_probs(state, tokens, len(level0)), aux=self._aux(len(tokens)))

    def _draft_probs(self, state, tokens: list[int], n_chain: int) -> torch.Tensor | None:
        """q per node: level 0's recorded distributions (sampling), one-hot for every deterministic draft."""
        if state.sampler.greedy:
            return None
        q = torch.zeros(len(tokens), state.model.config.vocab_size, device=state.model.device)
        q[torch.arange(len(tokens), device=q.device), torch.tensor(tokens, device=q.device)] = 1.0
        if self._q0 is not None:
            q[:n_chain] = self._q0
        return q

    def _aux(self, n_nodes: int) -> AuxBlock | None:
        """Levels 1..filled as aux tokens; level l column c at offset l + c, with the paper's mask."""
        cols = len(self._levels[0]) + 1
        aux = [t for level in self._levels[1:] for t in level]
        if not aux:
            return None
        mask = torch.zeros(len(aux), 1 + n_nodes + len(aux), dtype=torch.bool)
        offsets = []
        for level in range(1, len(self._levels)):
            for c in range(cols):
                row = (level - 1) * cols + c
                mask[row, : c + 1] = True  # the pending token and level 0's columns 1..c (nodes 0..c-1)
                for below in range(1, level + 1):  # column c of levels 1..level, itself included
                    mask[row, 1 + n_nodes + (below - 1) * cols + c] = True
                offsets.append(level + c)
        return AuxBlock(aux, offsets, mask)

    def observe(self, state, tree, acceptance, logits) -> None:
        cols = len(self._levels[0]) + 1
        n = len(tree)
        top = self._filled
        rows = torch.arange(cols) if top == 0 else 1 + n + (top - 1) * cols + torch.arange(cols)
        new = self._choose(state, logits[rows.to(logits.device)])[0]
        warmup = top < self.ngram - 2
        if not warmup:  # every column's trajectory, ending in its new token, is an N-gram
            for c in range(cols):
                gram = [tree.root if c == 0 else self._levels[0][c - 1]] + [lv[c] for lv in self._levels[1:]] + [new[c]]
                self._add(gram[0], tuple(gram[1:]))
        # Slide one position: warm-up drops every level's first column and adds a level; afterwards level 0
        # gives way to level 1 and the new tokens become the top level.
        if warmup:
            uppers = [lv[1:] for lv in self._levels[1:]] + [new[1:]]
            greedy_level0 = self._levels[0][1:]
        else:
            uppers = self._levels[2:] + [new]
            greedy_level0 = self._levels[1][1:]
        if state.sampler.greedy:
            self._levels, self._q0 = [greedy_level0, *uppers], None
        else:  # SJD: level 0 redrawn, fresh, from the rows that predict its positions after this step's tokens
            committed = len(acceptance.accepted) + 1
            rows = [self._row_predicting(committed + c, cols, n) for c in range(1, len(greedy_level0) + 1)]
            redraw, self._q0 = self._choose(state, logits[torch.tensor(rows, device=logits.device)])
            self._levels = [redraw, *uppers]
        if self.prompt_pool:
            self._index_committed(state.tokens)

    def _row_predicting(self, ahead: int, cols: int, n_nodes: int) -> int:
        """The logits row of this step that predicts the token `ahead` positions after its pending token.

        Level l column j predicts offset l + j + 1: take the lowest level that reaches (level 0 is the root
        and the chain; SJD's Jacobi update), or the top level's last column beyond the window's reach.
        """
        level = min(max(0, ahead - cols), self._filled)
        column = min(ahead - 1 - level, cols - 1)
        return column if level == 0 else 1 + n_nodes + (level - 1) * cols + column

    def _choose(self, state, logits: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """One token per row: argmax under greedy decoding, else a draw (with its distribution) from the
        run's processed distribution, on the drafter's own generator so the target's stream is untouched."""
        if state.sampler.greedy:
            return argmax_rows(logits), None
        probs = state.sampler.probs(logits)
        return torch.multinomial(probs, 1, generator=self._generator)[:, 0].tolist(), probs
