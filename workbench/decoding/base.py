"""Draft trees and the Drafter / Acceptor interfaces every decoding technique plugs into.

Each step the engine runs the target once over `[pending] + tree.tokens`: the pending token is the last
committed token (its KV not yet cached) and is the tree's root. Row 0 of the logits is the target's
distribution after the root, row i + 1 the distribution after node i. A chain is a tree whose nodes each
have one child; plain decoding proposes an empty tree.

A tree may carry an auxiliary block (`AuxBlock`): tokens that ride along in the same forward after the
nodes, with their own positions and mask rows, but are not drafts (lookahead decoding's Jacobi window). The
acceptor, the trace and the metrics see only the tree's rows; the cache never commits aux slots (they are
dropped like rejected drafts); the drafter reads their logits in `observe`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from workbench.sampling import Sampler

if TYPE_CHECKING:
    from workbench.cache.base import KVCache
    from workbench.models.llama import LlamaModel

ROOT = -1  # parent index of a node drafted directly after the pending token


@dataclass
class AuxBlock:
    """Non-draft tokens appended to the verification forward after the tree's nodes (see the module doc)."""

    tokens: list[int]  # [A] token ids
    offsets: list[int]  # [A] logical positions, relative to the pending token's
    mask: torch.Tensor  # [A, 1 + N + A] bool: what each aux token attends to among [pending, nodes, aux]
    # [A, hidden] input vectors used instead of the aux tokens' embeddings (trained prompt tokens, PPD); the
    # token ids then only hold places
    embeds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.offsets) or self.mask.shape[0] != len(self.tokens):
            raise ValueError("an aux block needs one offset and one mask row per token")
        if self.embeds is not None and self.embeds.shape[0] != len(self.tokens):
            raise ValueError("an aux block's embeds need one row per token")


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)  # [N] drafted token ids
    parents: list[int] = field(default_factory=list)  # [N] parent node index, ROOT for the root's children
    # q: [N, vocab] the (processed) draft distribution each node's token was drawn from; None for drafters
    # that propose deterministically (n-gram lookup, recycling), whose drafts are verified by matching.
    draft_probs: torch.Tensor | None = None
    root: int | None = None  # the pending token the tree hangs from; the engine sets it
    aux: AuxBlock | None = None  # non-draft tokens run in the same forward, after the nodes

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError("a draft tree needs one parent per token")
        for i, p in enumerate(self.parents):
            if not ROOT <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must come before their children")
        if self.aux and self.aux.mask.shape[1] != 1 + len(self.tokens) + len(self.aux.tokens):
            raise ValueError("aux mask rows must span the pending token, every node and every aux token")

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: list[int], draft_probs: torch.Tensor | None = None) -> DraftTree:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), draft_probs)

    @classmethod
    def trie(cls, drafts: list[list[int]]) -> DraftTree:
        """The drafts as one tree, shared prefixes merged, nodes in the drafts' order (the first leaf is
        drafts[0]'s)."""
        tokens: list[int] = []
        parents: list[int] = []
        child: dict[tuple[int, int], int] = {}
        for draft in drafts:
            node = ROOT
            for token in draft:
                if (node, token) not in child:
                    tokens.append(token)
                    parents.append(node)
                    child[(node, token)] = len(tokens) - 1
                node = child[(node, token)]
        return cls(tokens, parents)

    def depths(self) -> list[int]:
        """Depth of each node; the root's children have depth 1."""
        depth: list[int] = []
        for p in self.parents:
            depth.append(1 if p == ROOT else depth[p] + 1)
        return depth

    def children(self) -> dict[int, list[int]]:
        """Node index (ROOT included) -> its children, in drafting order."""
        out: dict[int, list[int]] = {ROOT: []}
        for i, p in enumerate(self.parents):
            out.setdefault(p, []).append(i)
            out.setdefault(i, [])
        return out

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def attention_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[N + 1 (+ A), N + 1 (+ A)] bool over root + nodes (+ aux): each node sees itself and its ancestors
        (tree attention, SpecInfer [arXiv 2305.09781, sec. 4.2]), never an aux token; aux rows are the
        block's own."""
        n = len(self.tokens) + 1
        a = len(self.aux.tokens) if self.aux else 0
        mask = torch.zeros(n + a, n + a, dtype=torch.bool)
        mask[:n, 0] = True
        for i, p in enumerate(self.parents):
            row = i + 1
            mask[row, row] = True
            mask[row] |= mask[p + 1]
        if self.aux:
            mask[n:] = self.aux.mask
        return mask.to(device)

    def position_ids(self, root_position: int) -> list[int]:
        """Logical positions of root + nodes (+ aux): the root's, plus each node's depth."""
        aux = [root_position + o for o in self.aux.offsets] if self.aux else []
        return [root_position] + [root_position + d for d in self.depths()] + aux

    def positions(self, root_position: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """[N + 1 (+ A)] `position_ids` as a tensor."""
        return torch.tensor(self.position_ids(root_position), device=device)

    def forward_tokens(self) -> list[int]:
        """What the target runs this step: root, nodes, then aux tokens."""
        return [self.root, *self.tokens, *(self.aux.tokens if self.aux else [])]


@dataclass
class DecodeState:
    """What drafters see: the model, its cache, the sampler and the tokens so far."""

    model: LlamaModel
    cache: KVCache
    sampler: Sampler
    prompt_ids: list[int]
    generated: list[int] = field(default_factory=list)  # the last one is pending: its KV is not cached yet
    step: int = 0
    # Kept across the runs of one loaded model (the Workbench owns it): drafters that learn from earlier runs
    # (token recycling's hot start) and cache policies' calibrations (CachePolicy.prepare) keep their state
    # here, under their own name.
    memory: dict = field(default_factory=dict)
    # The last layer's output (before the final norm) at the rows the last committed tokens were chosen from,
    # [tokens committed last step, hidden]: the last row is the state the pending token was predicted from.
    # Set only for drafters whose `wants_step_states` says so (draft heads read it; no second forward).
    hidden: torch.Tensor | None = None
    # The tokenizer, for techniques that read the output as text (the monitor); None for models without one.
    tokenizer: Any = None
    # The verification forward's last-layer states over [root, nodes] (before the final norm), set before
    # acceptance for acceptors whose `wants_tree_states` says so (the judge reads the draft tokens' states).
    tree_hidden: torch.Tensor | None = None

    @property
    def tokens(self) -> list[int]:
        """Prompt and generated tokens, in order."""
        return self.prompt_ids + self.generated

    @property
    def pending(self) -> int:
        return self.generated[-1]

    @property
    def pending_position(self) -> int:
        return len(self.prompt_ids) + len(self.generated) - 1


@dataclass
class Acceptance:
    """What an acceptor decided about one verified tree."""

    accepted: list[int]  # node indices on the accepted path, root to leaf
    bonus: int  # the token the target chose after the accepted path


class Drafter:
    """Proposes a draft tree each step. Subclasses are registered dataclasses under `decoding`.

    `begin` is called once per run after prefill, `propose` before each verification, `observe` after it
    (adaptive drafters learn there). A fresh instance is built for every run, so state never leaks.
    """

    default_acceptor = "match"
    # True when every tree it proposes carries `draft_probs`: acceptors that read q check it at spec time.
    draft_distribution = False
    # True when `begin` picked up state kept from earlier runs (an opt-in warm start, e.g. token recycling's
    # hot_start): the run's drafts then depend on what ran before it, and its trace says so.
    warm_started = False

    def begin(self, state: DecodeState) -> None:
        """Set up per-run state (the prompt and the target model are on `state`)."""

    def wants_prompt_states(self) -> bool:
        """Whether `observe_prompt` should get the prefill's last-layer states for every prompt token."""
        return False

    def wants_step_states(self) -> bool:
        """Whether the engine should keep the verification forward's last-layer states in `state.hidden`."""
        return False

    def observe_prompt(self, state: DecodeState, hidden: torch.Tensor) -> None:
        """The prefill's last-layer output [prompt tokens, hidden], after `begin`, when `wants_prompt_states`
        says so: `state.model.logits(hidden[rows])` gives those rows' logits."""

    def check_run(self, model: LlamaModel, prompt_tokens: int) -> None:
        """Refuse (SpecError) a run this drafter cannot do on `model` with a prompt this long, before it starts."""

    def propose(self, state: DecodeState) -> DraftTree:
        raise NotImplementedError

    def fit(self, state: DecodeState, tree: DraftTree) -> DraftTree:
        """The tree the target verifies this step: `tree` itself, unless the drafter drafts under a memory
        budget (SpecMemo's mixin, decoding/specmemo.py, cuts it to fit)."""
        return tree

    def observe(self, state: DecodeState, tree: DraftTree, acceptance: Acceptance, logits: torch.Tensor) -> None:
        """Called after verification, once the step's tokens are committed to `state`, with the target's
        logits [N + 1 (+ A), vocab] over the root, the nodes (and the tree's aux tokens, if any)."""


class Acceptor:
    """Decides which drafted nodes the target accepts, and the bonus token. Registered under `acceptance`."""

    lossless = True

    def begin(self, state: DecodeState) -> None:
        """Called once per run before the first token is chosen. `state` stays the run's own: `state.tokens` are
        the token ids so far (growing as the run goes), `state.tokenizer` the tokenizer (None without one)."""

    def check_drafter(self, drafter: Drafter) -> None:
        """Refuse (SpecError) a drafter this acceptor cannot work with; called when a run spec is checked."""

    def wants_tree_states(self) -> bool:
        """Whether the engine should put the verification forward's last-layer states in `state.tree_hidden`."""
        return False

    def accept(self, tree: DraftTree, logits: torch.Tensor, probs: torch.Tensor, sampler: Sampler) -> Acceptance:
        """logits, probs: [N + 1, vocab], the target's raw logits and `sampler.probs(logits)`."""
        raise NotImplementedError
