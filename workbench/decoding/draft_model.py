"""Speculative decoding with a draft model: a smaller model proposes k tokens, the target verifies them.

Papers: Leviathan et al. (arXiv 2211.17192) and Chen et al. (arXiv 2302.01318); the shallow self-draft is
Kangaroo's (Liu et al., arXiv 2404.18911) early-exit draft without its trained adapter.

Each step the draft model catches up on the tokens committed since it last ran (one forward), then drafts
k tokens one at a time: greedily under greedy decoding, otherwise by sampling from its distribution after
the run's logits processing, recording that distribution q for the acceptor. It keeps its own KV cache;
after verification the cache is cut back to the tokens that were accepted, so rejected drafts never
linger. `draft=self` drafts with the target's first `layers` layers plus its final norm and LM head (no
copy of any weight: the same model runs with a layer plan on a separate cache). Any other value is a
model name or path (GGUF, Hugging Face folder) with the target's vocabulary. `compress` drafts with a
compressed copy of the target (quantized self-speculation: every layer unless `layers` says fewer; layers
not replaced share the target's tensors), verified by the uncompressed target, so output stays lossless.
Its value is a compression chain, with `/` between one transform's parameters, because `,` separates the
drafter's own: `compress=int4:group=32/head=true+prune`. Calibrated transforms (gptq, eora) calibrate such a
draft on seeded random token ids: the drafter sees the model, not its tokenizer. Left out: Kangaroo's
trained adapter and its double early exit, and dynamic draft lengths (see the adaptive-length wrapper).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from workbench.cache.base import KVCache
from workbench.cache.dense import DenseLayerCache
from workbench.compression.base import apply_compression
from workbench.decoding.base import Drafter, DraftTree
from workbench.errors import SpecError
from workbench.models import LoadedModel
from workbench.models.llama import LlamaModel
from workbench.registry import param, register
from workbench.spec import TechniqueSpec


@register("decoding", "draft_model", lossless=True)
@dataclass
class DraftModel(Drafter):
    """Draft k tokens with a smaller model (or the target's first layers); verified losslessly."""

    default_acceptor = "speculative"
    draft_distribution = True  # every tree carries its draft distribution q

    k: int = param(4, "tokens drafted per step", min=1, max=32)
    draft: str = param("self", "'self' (the target's first `layers` layers, final norm and head) or a model "
                       "name or path with the same vocabulary")
    layers: int = param(0, "layers of the target that a self-draft runs; 0: 4, or all of them with compress",
                        min=0, max=512)
    compress: str = param("", "draft with a compressed copy of the target: a compression chain, '/' between "
                          "one transform's parameters (e.g. int4:group=32/head=true)")
    _model: LlamaModel | None = field(init=False, default=None, repr=False)
    _plan: list[int] | None = field(init=False, default=None)
    _cache: KVCache | None = field(init=False, default=None, repr=False)
    _generator: torch.Generator | None = field(init=False, default=None, repr=False)
    # Set by a drafter that brings its own draft model (fastdraft's trained one): drafts with it, all its layers.
    given_model: LlamaModel | None = field(init=False, default=None, repr=False)
    # Set by the adaptive-length wrapper: given the draft probabilities of the tokens drafted so far, whether
    # to stop drafting now.
    stop_rule: Callable[[list[float]], bool] | None = field(init=False, default=None, repr=False)
    # Set by the adaptive-length wrapper with a trained acceptance head (SpecDec++): given the draft's last-layer
    # state [hidden] (before its final norm) at the row a token was drafted from, the predicted probability that
    # the token is accepted; `stop_rule` then reads these instead of the draft's own probabilities.
    acceptance_head: Callable[[torch.Tensor], float] | None = field(init=False, default=None, repr=False)
    _last_hidden: torch.Tensor | None = field(init=False, default=None, repr=False)

    def check(self) -> None:
        if self.compress and self.draft != "self":
            raise ValueError(f"compress applies to draft=self (a compressed copy of the target), not {self.draft!r}")
        compression_chain(self.compress)  # unknown transforms and bad parameters raise SpecError here

    def begin(self, state) -> None:
        target = state.model
        if self.given_model is not None:
            self._model, self._plan, n_layers = self.given_model, None, self.given_model.config.num_layers
        elif self.compress:
            # Compressing takes seconds (minutes if calibrated): one copy per target and chain, kept across runs.
            key = f"draft_model:compress={self.compress}"
            model = state.memory.get(key)
            if model is None:
                model = state.memory[key] = compressed_copy(target, compression_chain(self.compress))
            n_layers = self.layers or target.config.num_layers
            if n_layers > target.config.num_layers:
                raise SpecError(f"draft_model: layers={self.layers} exceeds the target's {target.config.num_layers}")
            self._model, self._plan = model, list(range(n_layers))
        elif self.draft == "self":
            n_layers = self.layers or 4
            if n_layers >= target.config.num_layers:
                raise SpecError(f"draft_model: layers={n_layers} must be fewer than the target's "
                                f"{target.config.num_layers} layers")
            self._model, self._plan = target, list(range(n_layers))
        else:
            from workbench.models import load_model

            loaded = load_model(self.draft, str(target.dtype).removeprefix("torch."), str(target.device))
            if loaded.config.vocab_size != target.config.vocab_size:
                raise SpecError(f"draft_model: the draft's vocabulary ({loaded.config.vocab_size} tokens) differs "
                                f"from the target's ({target.config.vocab_size}); use a draft with the same "
                                "tokenizer")
            self._model, self._plan, n_layers = loaded.model, None, loaded.config.num_layers
        config = self._model.config
        capacity = len(state.prompt_ids) + 256
        self._cache = KVCache([DenseLayerCache(config.num_kv_heads, config.head_dim, self._model.dtype,
                                               self._model.device, capacity) for _ in range(n_layers)])
        # A generator of its own, so drafting never shifts the target's random stream.
        self._generator = torch.Generator(device=target.device).manual_seed(state.sampler.seed + 1)

    def _forward(self, tokens: list[int], start: int) -> torch.Tensor:
        device = self._model.device
        out = self._model(torch.tensor(tokens, device=device), torch.arange(start, start + len(tokens), device=device),
                          self._cache, layers=self._plan, last_only=True, final_hidden=self.acceptance_head is not None)
        self._cache.commit()
        if self.acceptance_head is not None:
            self._last_hidden = out.final_hidden[-1]
        return out.logits[0]

    def _tree_forward(self, tree_tokens: list[int], parents: list[int], root_position: int, wanted: list[int],
                      sampler) -> list[torch.Tensor]:
        """Draft distributions after the `wanted` nodes: one forward over the tree hanging from the pending
        token at `root_position` (already in the draft cache), then a rollback of the draft cache."""
        tree = DraftTree(tree_tokens, parents)
        device = self._model.device
        mask = tree.attention_mask(device)[1:, 1:]  # the root is in the draft cache already
        positions = tree.positions(root_position, device)[1:]
        logits = self._model(torch.tensor(tree_tokens, device=device), positions, self._cache, mask=mask,
                             layers=self._plan).logits
        self._cache.rollback()
        return list(sampler.probs(logits[wanted]))

    def propose(self, state) -> DraftTree:
        sampler = state.sampler
        tokens = state.tokens
        held = self._cache[0].length
        logits = self._forward(tokens[held:], held)  # catch up, ending with the pending token
        drafted: list[int] = []
        dists: list[torch.Tensor] = []
        confidences: list[float] = []
        for i in range(self.k):
            q = sampler.probs(logits)
            token = int(q.argmax()) if sampler.greedy else int(torch.multinomial(q, 1, generator=self._generator))
            drafted.append(token)
            dists.append(q)
            head = self.acceptance_head
            confidences.append(float(q[token]) if head is None else head(self._last_hidden))
            if self.stop_rule is not None and self.stop_rule(confidences):
                break
            if i + 1 < self.k:
                logits = self._forward([token], len(tokens) + i)
        return DraftTree.chain(drafted, torch.stack(dists))

    def observe(self, state, tree, acceptance, logits) -> None:
        # Keep the draft's KV only for tokens now committed: everything before the new pending token.
        self._cache.keep_first(len(state.tokens) - 1)


def compression_chain(text: str) -> list[TechniqueSpec]:
    """TechniqueSpecs of a compression chain written inside a drafter parameter ('/' for ','), validated."""
    return [TechniqueSpec.parse(t.replace("/", ",")).validated("compression") for t in text.split("+") if t.strip()]


def compressed_copy(target: LlamaModel, chain: list[TechniqueSpec]) -> LlamaModel:
    """A copy of `target` with `chain` applied: new modules, sharing every tensor the chain does not replace."""
    shared = {id(t): t for t in [*target.parameters(), *target.buffers()]}
    shared.update({id(m.packed): m.packed for m in target.modules() if hasattr(m, "packed_nbytes")})
    model = copy.deepcopy(target, shared)
    loaded = LoadedModel(model, None, model.config, "draft", "draft", model.dtype, model.device)
    apply_compression(loaded, chain)
    return model
