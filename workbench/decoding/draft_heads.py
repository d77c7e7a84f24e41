"""What the trained draft heads share: their checkpoints, their candidate tree, and their training.

Medusa-style drafters (medusa, hydra) put small trained modules on the target's last-layer state: head d
guesses the token d places after the one the target itself predicts there. The candidate tree comes from
the heads' top-k lists, shaped as Medusa does (Cai et al., arXiv 2401.10774, sec. 3.3.1): a node is a
path of ranks (i1, ..., id), "head 1's i1-th guess, then head 2's i2-th guess, ...", expected to be accepted
with probability prod_j acc[j][i_j], where acc[j][i] is head j's measured held-out rate of its i-th guess
being right; the tree is the `nodes` paths of highest expectation. Verification is the engine's matching
walk over the tree (lossless).

Draft vocabulary (`vocab`, after FR-Spec: Zhao et al., "FR-Spec: Accelerating Large-Vocabulary Language Models
via Frequency-Ranked Speculative Sampling", arXiv 2502.14856, and EAGLE-3's reduced draft vocabulary): the
heads' guesses are scored over only the `vocab` tokens the target produced most often in its training
continuations (counted at training time, kept in the checkpoint), so each guess multiplies by a slice of the
LM head instead of all of it. Verification still scores the whole vocabulary, so output is unchanged; a token
outside the slice can only be missed as a guess. FR-Spec counts a large corpus; here the counts are the
self-distilled training data's.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from workbench.decoding.base import DecodeState, Drafter, DraftTree
from workbench.decoding.specmemo import MemoryBudget
from workbench.errors import SpecError
from workbench.registry import param
from workbench.training.checkpoints import load_checkpoint, trained_path


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


def tree_size(default: int):
    """The `nodes` parameter with a drafter's own default (a tree costs its rows in every verification)."""
    return param(default, "candidate tree size, the paths of highest measured acceptance", min=1, max=128)


def final_norm(model, hidden: torch.Tensor) -> torch.Tensor:
    """The target's final RMSNorm in float32 (what its LM head reads)."""
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
    return x * model.norm.float()


def load_trained(state: DecodeState, kind: str, settings: dict[str, Any], build) -> tuple[torch.nn.Module, Any]:
    """`kind`'s trained module for this model and settings (built by `build(settings)`, float32, eval mode) and its
    measured acceptance; loaded once per model, or a SpecError saying how to train it."""
    path = trained_path(kind, state.model, settings)
    key = f"{kind}:{path.name}"  # loaded once per model; the checkpoint never changes what a run does
    if key not in state.memory:
        payload = load_checkpoint(path)
        if payload is None:
            options = ",".join(f"{k}={v}" for k, v in settings.items())
            flags = " ".join(f"--{k} {v}" for k, v in settings.items())
            raise SpecError(f"no trained {kind} drafter for this model with {options}; train one with "
                            f"`workbench train {kind} {flags} --model <the same model>` (minutes on a CPU), then "
                            f"run again")
        module = build(payload["settings"])
        module.load_state_dict(payload["state_dict"])
        module.token_counts = payload.get("token_counts")  # for the draft vocabulary (None: an older checkpoint)
        module.draft_heads = {}  # the LM head's slices, one per vocabulary size asked for
        state.memory[key] = module.float().eval(), payload["acceptance"]
    return state.memory[key]


@dataclass
class HeadDrafter(MemoryBudget, Drafter):
    """Base of drafters built on trained heads: loads the checkpoint, builds the tree, reads the states.

    Subclasses set `kind` (the checkpoint's name) and `module_class` (the heads: `module_class(hidden, heads)`),
    and implement `head_logits` (training and evaluation) and `draft(state)` (one token per path)."""

    kind = ""
    module_class: ClassVar[type] = torch.nn.Module
    # Needs a checkpoint trained for the model: the registry-wide test matrices leave it to
    # tests/test_draft_heads.py, which trains one per test model.
    needs_training = True
    heads: int = param(4, "number of heads (tokens guessed past the target's own); must match a trained "
                       "checkpoint", min=1, max=8)
    nodes: int = tree_size(24)
    vocab: int = param(8192, "draft vocabulary: guesses come from the N tokens the target produced most often in "
                       "training (FR-Spec); 0 = the whole vocabulary", min=0, max=1_000_000)
    trained: Any = field(init=False, default=None)  # the trained module, in eval mode
    paths: list[tuple[int, ...]] = field(init=False, default_factory=list)
    parents: list[int] = field(init=False, default_factory=list)  # the tree's shape, fixed for the run
    width: int = field(init=False, default=0)  # top-k needed from each head

    def settings(self) -> dict[str, Any]:
        """What a checkpoint depends on."""
        return {"heads": self.heads}

    @classmethod
    def depth(cls, settings: dict[str, Any]) -> int:
        """Tokens guessed past the target's own, per position (what training and acceptance measure)."""
        return settings["heads"]

    @classmethod
    def training_data(cls, sequences, model, settings: dict[str, Any]):
        """Training and held-out data from self-distilled sequences: independent positions (the heads read one
        state); drafters that attend over the context return `training.heads.Contexts` instead."""
        from workbench.training.heads import Positions

        return Positions.of(sequences, model, cls.depth(settings))

    @classmethod
    def new_module(cls, model, settings: dict[str, Any]) -> torch.nn.Module:
        """Untrained heads for training, with the target's LM head (frozen) in float32 beside them."""
        module = cls.module_class(model.config.hidden_size, settings["heads"])
        module.head_weight = model.lm_head.weight.detach().float()
        return module

    def wants_step_states(self) -> bool:
        return True

    def begin(self, state: DecodeState) -> None:
        self.trained, acc = load_trained(state, self.kind, self.settings(),
                                         lambda s: self.module_class(state.model.config.hidden_size, s["heads"]))
        self.paths = tree_paths(acc, self.nodes)
        index = {path: i for i, path in enumerate(self.paths)}
        self.parents = [index[p[:-1]] if len(p) > 1 else -1 for p in self.paths]
        self.width = 1 + max(max(p) for p in self.paths)
        self.draft_head(state.model)  # a draft vocabulary that cannot work is refused before the first step

    def propose(self, state: DecodeState) -> DraftTree:
        return DraftTree(self.draft(state), list(self.parents))

    def guesses(self, model, features: torch.Tensor) -> list[list[int]]:
        """Each feature row's top `self.width` tokens under the target's LM head, over the draft vocabulary."""
        head, ids = self.draft_head(model)
        top = head(features.to(model.dtype)).topk(self.width, dim=-1).indices
        return (top if ids is None else ids[top]).tolist()

    def draft_head(self, model) -> tuple[torch.nn.Module, torch.Tensor | None]:
        """The LM head's rows of the `vocab` most frequent training tokens and their ids (built once per
        checkpoint and size), or the whole LM head and None."""
        if not self.vocab or self.vocab >= model.config.vocab_size:
            return model.lm_head, None
        counts = self.trained.token_counts
        if counts is None:
            raise SpecError(f"this {self.kind} checkpoint has no token counts for a draft vocabulary (it predates "
                            f"them); train it again with `workbench train {self.kind}`, or run {self.kind}:vocab=0")
        if self.vocab < self.width:
            raise SpecError(f"{self.kind}:vocab={self.vocab} is smaller than the {self.width} guesses per head its "
                            f"tree of {self.nodes} nodes takes; use vocab >= {self.width}, or 0 for all tokens")
        if self.vocab not in self.trained.draft_heads:
            from workbench.models.packed_linear import PackedLinear, can_pack

            ids = counts.float().topk(self.vocab).indices.sort().values
            rows = torch.nn.Linear(model.config.hidden_size, self.vocab, bias=False, dtype=model.dtype,
                                   device=model.device)
            rows.weight.data.copy_(model.lm_head.weight.detach()[ids])
            head = PackedLinear(rows) if can_pack(model.dtype, model.device) else rows
            self.trained.draft_heads[self.vocab] = head, ids.to(model.device)
        return self.trained.draft_heads[self.vocab]

    def draft(self, state: DecodeState) -> list[int]:
        """One token per path of `self.paths`."""
        raise NotImplementedError
