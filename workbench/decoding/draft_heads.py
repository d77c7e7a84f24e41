"""What the trained draft heads share: their checkpoints, their candidate tree, and their training.

Medusa-style drafters (medusa, hydra) put small trained modules on the target's last-layer state: head d
guesses the token d places after the one the target itself predicts there. The candidate tree comes from
the heads' top-k lists, shaped as Medusa does (Cai et al., arXiv 2401.10774, sec. 3.3.1): a node is a
path of ranks (i1, ..., id), "head 1's i1-th guess, then head 2's i2-th guess, ...", expected to be accepted
with probability prod_j acc[j][i_j], where acc[j][i] is head j's measured held-out rate of its i-th guess
being right; the tree is the `nodes` paths of highest expectation. Verification is the engine's matching
walk over the tree (lossless).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.decoding.base import DecodeState, Drafter, DraftTree
from workbench.errors import SpecError
from workbench.training.checkpoints import checkpoint_path, load_checkpoint


def tree_paths(acc: list[list[float]], nodes: int) -> list[tuple[int, ...]]:
    """The `nodes` rank paths of highest expected acceptance, prefixes first (a valid tree, parents first)."""
    depth, width = len(acc), len(acc[0])
    scored = []
    for d in range(1, depth + 1):
        for path in itertools.product(range(width), repeat=d):
            value = math.prod(acc[j][i] for j, i in enumerate(path))
            scored.append((-value, d, path))
    scored.sort()
    chosen: set[tuple[int, ...]] = set()
    for _, _, path in scored:  # a path enters only after its prefix: expectations never grow with depth
        if len(chosen) == nodes:
            break
        if len(path) == 1 or path[:-1] in chosen:
            chosen.add(path)
    return sorted(chosen, key=lambda p: (len(p), p))


def final_norm(model, hidden: torch.Tensor) -> torch.Tensor:
    """The target's final RMSNorm in float32 (what its LM head reads)."""
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
    return x * model.norm.float()


@dataclass
class HeadDrafter(Drafter):
    """Base of drafters built on trained heads: loads the checkpoint, builds the tree, reads the states.

    Subclasses set `kind` (the checkpoint's name), implement `settings` (what the checkpoint depends on) and
    `draft(state, paths)` (one token per path)."""

    kind = ""
    # Needs a checkpoint trained for the model: the registry-wide test matrices leave it to
    # tests/test_draft_heads.py, which trains one per test model.
    needs_training = True
    nodes: int = 0  # set by the subclass's param
    trained: Any = field(init=False, default=None)  # the trained module, in eval mode
    paths: list[tuple[int, ...]] = field(init=False, default_factory=list)

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def wants_step_states(self) -> bool:
        return True

    def begin(self, state: DecodeState) -> None:
        path = checkpoint_path(self.kind, state.model, self.settings())
        key = f"{self.kind}:{path.name}"  # loaded once per model; the checkpoint never changes what a run does
        if key not in state.memory:
            payload = load_checkpoint(path)
            if payload is None:
                options = ",".join(f"{k}={v}" for k, v in self.settings().items())
                raise SpecError(f"no trained {self.kind} drafter for this model with {options}; train one with "
                                f"`workbench train {self.kind} --model <the same model>` (a few minutes on a CPU), "
                                f"then run again")
            state.memory[key] = self.build(payload, state.model)
        self.trained, acc = state.memory[key]
        self.paths = tree_paths(acc, self.nodes)

    def build(self, payload: dict[str, Any], model) -> tuple[Any, list[list[float]]]:
        """The module from a checkpoint (in the model's dtype) and its measured top-k acceptance."""
        raise NotImplementedError

    def propose(self, state: DecodeState) -> DraftTree:
        tokens = self.draft(state, self.paths)
        index = {path: i for i, path in enumerate(self.paths)}
        parents = [index[p[:-1]] if len(p) > 1 else -1 for p in self.paths]
        return DraftTree(tokens, parents)

    def draft(self, state: DecodeState, paths: list[tuple[int, ...]]) -> list[int]:
        raise NotImplementedError
