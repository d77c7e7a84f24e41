"""The engine: one loop for every decoding technique (docs/architecture.md).

    state = prefill(prompt)
    while not done:
        tree = drafter.propose(state)                 # empty for plain decoding
        logits = model(pending + tree, tree mask, per-node positions, cache)
        acceptance = acceptor.accept(tree, logits)    # accepted path + bonus token
        cache.commit(accepted slots); drafter.observe(...); policies.on_step_end(cache)
        yield StepEvent(...)

Everything the surfaces and the store need leaves the loop as StepEvents; metrics are computed from them
in `workbench.metrics`, never here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.cache.base import CachePolicy, KVCache
from workbench.cache.dense import DensePolicy
from workbench.cache.stats import CacheStats, cache_stats, kept_sampled
from workbench.decoding.base import Acceptor, DecodeState, Drafter, DraftTree
from workbench.errors import PromptError, SpecError
from workbench.models.llama import LlamaModel
from workbench.models.static_step import StaticSteps
from workbench.sampling import Sampler, top_k
from workbench.spec import RunSpec, TechniqueSpec

TOP_ALTERNATIVES = 5  # alternatives kept per generated token, for hovers in the views
DRAFT_HEADROOM = 64  # cache slots reserved beyond prompt + max_new_tokens for trees in flight


@dataclass
class TreeRecord:
    """One verified draft tree, as data for the trace, the store and the tree view."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    draft_probs: list[float | None]  # q of each node's token under the draft, when the drafter has one
    target_probs: list[float]  # p of each node's token under the target, given its parent
    accepted: list[bool]


@dataclass
class StepEvent:
    step: int  # 0 is the prefill
    tokens: list[int]  # tokens committed by this step: accepted drafts, then the bonus token
    sources: list[str]  # "accepted" or "bonus", per token
    logprobs: list[float]  # log p of each token under the target's (processed) distribution
    entropies: list[float]  # entropy of that distribution, nats
    alternatives: list[list[tuple[int, float]]]  # top tokens and probabilities at each token's position
    positions: list[int]  # logical position of each token
    text: str  # the text these tokens add (held back while a character is incomplete)
    tree: TreeRecord | None  # None for the prefill and for steps that drafted nothing
    draft_ns: int
    verify_ns: int  # the target forward (the whole prompt for the prefill)
    accept_ns: int  # acceptance, cache commit, drafter learning and cache policies
    elapsed_ns: int  # since the run started, at the end of this step
    cache_bytes: int = 0  # bytes the process holds for the KV cache after this step (its tensors' storages)
    cache_live_bytes: int = 0  # of which the tokens held take, in their stored form (keys, values, metadata)
    cache_off_bytes: int = 0  # bytes a two-tier policy holds off the fast tier (host memory); cache_bytes excludes them
    cache_moved_bytes: int = 0  # bytes brought back from the off tier so far in the run
    cache_moved_ns: int = 0  # time spent bringing them back so far in the run
    loaded_tokens: int = 0  # prefill only: prompt tokens whose cache was loaded (a CacheGen file), not prefilled
    load_ns: int = 0  # prefill only: the time loading them took (inside the time to first token)
    # Forwards through all of the target's layers that the drafter ran itself while drafting (a search's
    # expansions, lookaheads, a draft over a sparse view of the target's cache), beside the step's verification
    drafter_forwards: int = 0
    cache_tokens: list[int] = field(default_factory=list)  # tokens held per layer
    finish_reason: str | None = None  # "eos", "stop", "length" on the last step
    cache_stats: CacheStats | None = None  # per layer and head; kept positions on sampled steps (cache/stats.py)
    # The target's own argmax at each token's position: where it differs from the token, the output departs
    # from what greedy plain decoding would have produced there (lossy techniques; see workbench/divergence.py).
    target_argmax: list[int] = field(default_factory=list)

    @property
    def n_drafted(self) -> int:
        return len(self.tree.tokens) if self.tree else 0

    @property
    def n_accepted(self) -> int:
        return self.sources.count("accepted")


def build_cache(model: LlamaModel, policies: list[CachePolicy], capacity: int) -> KVCache:
    """One layer cache per layer; the last policy that chooses a storage form for a layer wins."""
    chain = [DensePolicy(), *policies]
    layers = []
    for i in range(model.config.num_layers):
        for policy in reversed(chain):
            layer = policy.make_layer_cache(i, model.config, model.dtype, model.device, capacity)
            if layer is not None:
                layers.append(layer)
                break
    cache = KVCache(layers)
    for policy in policies:
        policy.on_cache_built(cache)
    return cache


class Engine:
    """Runs one RunSpec's decoding loop on a loaded model. Build one per run."""

    def __init__(
        self,
        model: LlamaModel,
        spec: RunSpec,
        eos_ids: list[int] | None = None,
        detokenize: Callable[[list[int]], str] | None = None,
        memory: dict | None = None,
        tokenizer: Any = None,
        acceptor: Acceptor | None = None,
        policies: list[CachePolicy] | None = None,
    ):
        """`acceptor` and `policies`, when given, replace the spec's (the teacher-forced quality pass in
        `workbench.eval.quality` forces each token through an acceptor and takes policy objects)."""
        self.model = model
        self.tokenizer = tokenizer  # for policies' `prepare` (an offline calibration); None for random models
        self.spec = spec.validated()
        self.eos_ids = set(eos_ids or [])
        self.detokenize = detokenize or (lambda ids: "".join(f"<{i}>" for i in ids))
        self.memory = {} if memory is None else memory
        self.drafter: Drafter = self.spec.decode.build("decoding")
        accept = self.spec.accept or TechniqueSpec(self.drafter.default_acceptor)
        self.acceptor: Acceptor = acceptor or accept.build("acceptance")
        self.policies: list[CachePolicy] = [t.build("cache") for t in self.spec.cache] if policies is None else policies
        self.sampler = Sampler(self.spec.temperature, self.spec.top_k, self.spec.top_p, self.spec.min_p,
                               self.spec.seed, device=model.device)
        self.static: StaticSteps | None = None  # the run's static decoding steps (graphs), once it has started

    def check_prompt(self, prompt_ids: list[int]) -> None:
        context = self.model.config.context_window
        if not prompt_ids:
            raise PromptError("the prompt is empty; give at least one token of text")
        if len(prompt_ids) >= context:
            raise PromptError(f"the prompt has {len(prompt_ids)} tokens but the model's context window is "
                              f"{context}; shorten it to at most {context - 1} tokens")
        self.drafter.check_run(self.model, len(prompt_ids))

    def warnings(self, prompt_ids: list[int]) -> list[str]:
        """What the cache policies say a user should know about a run of this prompt (CachePolicy.warnings)."""
        new = max(min(self.spec.max_new_tokens, self.model.config.context_window - len(prompt_ids)), 0)
        return [w for policy in self.policies for w in policy.warnings(len(prompt_ids), new)]

    @torch.inference_mode()
    def run(self, prompt_ids: list[int]) -> Iterator[StepEvent]:
        """Prefill, then decode until EOS, a stop string, max_new_tokens or the context limit."""
        self.check_prompt(prompt_ids)
        spec, model = self.spec, self.model
        device = model.device
        budget = min(spec.max_new_tokens, model.config.context_window - len(prompt_ids))
        for policy in self.policies:
            policy.prepare(model, self.tokenizer, self.memory)
        cache = build_cache(model, self.policies, len(prompt_ids) + budget + DRAFT_HEADROOM)
        self.static = static = StaticSteps(model, cache, self.policies, spec.graphs)
        state = DecodeState(model, cache, self.sampler, list(prompt_ids), memory=self.memory, tokenizer=self.tokenizer)
        self.acceptor.begin(state)
        judged = self.acceptor.wants_tree_states()  # an acceptor that reads the draft tokens' last-layer states
        text = _TextStream(self.detokenize, spec.stop)
        start = time.perf_counter_ns()
        learns = self.drafter.wants_prompt_states()
        # a policy may hold the cache of the prompt's first tokens (a CacheGen file): loading counts in the ttft
        t_load = time.perf_counter_ns()
        loaded = max((policy.load_prefix(cache, list(prompt_ids)) for policy in self.policies), default=0)
        load_ns = time.perf_counter_ns() - t_load
        if loaded and learns:
            raise SpecError(f"{spec.decode.name} learns from every prompt token's states, but {loaded} of them were "
                            "loaded from a cache file, not prefilled; use another drafter with a loaded cache")

        # Prefill: the whole prompt (or what a loaded cache leaves), logits for its last token only (and every
        # token's last-layer state for a drafter that learns from them).
        t0 = time.perf_counter_ns()
        tokens = torch.tensor(prompt_ids[loaded:], device=device)
        heads = self.drafter.wants_step_states()  # draft heads read the last layer's states of each step
        out = model(tokens, torch.arange(loaded, len(prompt_ids), device=device), cache, last_only=True,
                    final_hidden=learns or heads)
        logits = out.logits
        _sync(device)
        t1 = time.perf_counter_ns()
        probs = self.sampler.probs(logits)
        first = self.acceptor.accept(DraftTree(), logits, probs, self.sampler).bonus  # an empty tree: sampling
        cache.commit()
        for policy in self.policies:
            policy.on_prefill_end(cache)
        if heads:
            state.hidden = out.final_hidden[-1:]
        counted = _whole_forwards(model)
        self.drafter.begin(state)
        if learns:
            self.drafter.observe_prompt(state, out.final_hidden)
        event = self._event(state, [first], ["bonus"], logits, probs, [0], None, 0, t1 - t0, t1, start, text, budget)
        event.loaded_tokens, event.load_ns = loaded, load_ns if loaded else 0
        event.drafter_forwards = _whole_forwards(model) - counted
        self._record_cache(event, state)
        yield event
        if event.finish_reason:
            return

        while True:
            state.step += 1
            t0 = time.perf_counter_ns()
            counted = _whole_forwards(model)
            tree = self.drafter.fit(state, self.drafter.propose(state))
            tree.root = state.pending
            drafter_forwards = _whole_forwards(model) - counted
            t1 = time.perf_counter_ns()
            # tokens and positions in one host-to-device copy (on a GPU each one waits for the device)
            step_ids = torch.tensor([tree.forward_tokens(), tree.position_ids(state.pending_position)], device=device)
            tree_tokens, positions = step_ids[0], step_ids[1]
            mask = tree.attention_mask(device) if len(tree_tokens) > 1 else None
            embeds = _step_embeds(model, tree, tree_tokens)
            # the static step (a CUDA graph's replay) where the run allows it, else the eager forward
            out = static.forward(tree_tokens, positions, mask, heads or judged or embeds is not None) or \
                model(tree_tokens, positions, cache, mask=mask, final_hidden=heads or judged, embeds=embeds)
            all_logits = out.logits
            _sync(device)
            t2 = time.perf_counter_ns()
            logits = all_logits[: len(tree) + 1]  # aux rows (tree.aux) are the drafter's alone, never candidates
            probs = self.sampler.probs(logits)
            if judged:
                state.tree_hidden = out.final_hidden[: len(tree) + 1]
            acceptance = self.acceptor.accept(tree, logits, probs, self.sampler)
            cache.commit([0] + [node + 1 for node in acceptance.accepted])  # rejected nodes and aux slots drop
            new_tokens = [tree.tokens[n] for n in acceptance.accepted] + [acceptance.bonus]
            rows = [0] + [n + 1 for n in acceptance.accepted]  # the row each new token was chosen from
            if heads:
                state.hidden = out.final_hidden[rows]
            record = _tree_record(tree, acceptance.accepted, probs) if len(tree) else None
            sources = ["accepted"] * len(acceptance.accepted) + ["bonus"]
            event = self._event(state, new_tokens, sources, logits, probs, rows, record, t1 - t0, t2 - t1, t2, start,
                                text, budget)  # commits the tokens to the state
            counted = _whole_forwards(model)
            self.drafter.observe(state, tree, acceptance, all_logits)
            event.drafter_forwards = drafter_forwards + _whole_forwards(model) - counted
            for policy in self.policies:
                policy.on_step_end(cache)
            if len(event.tokens) < len(new_tokens):  # the output ended inside the accepted path (EOS, a stop,
                cache.drop_newest(len(new_tokens) - len(event.tokens))  # the budget): cache exactly the context
            self._record_cache(event, state)  # after the policies: what they left
            end = time.perf_counter_ns()
            event.accept_ns, event.elapsed_ns = end - t2, end - start
            yield event
            if event.finish_reason:
                return

    def _event(self, state, new_tokens, sources, logits, probs, rows, tree, draft_ns, verify_ns, t_verified, start,
               text, budget) -> StepEvent:
        """Commit new tokens to the state (cut at EOS, stop strings or the budget) and describe the step."""
        finish = None
        keep = len(new_tokens)
        for i, token in enumerate(new_tokens):
            if token in self.eos_ids:
                keep, finish = i + 1, "eos"
                break
        room = budget - len(state.generated)
        if keep >= room:
            keep, finish = room, finish or "length"
        new_tokens, sources, rows = new_tokens[:keep], sources[:keep], rows[:keep]
        state.generated.extend(new_tokens)
        added, stop_at = text.extend(new_tokens)
        if finish and stop_at is None:
            added += text.flush()
        if stop_at is not None:  # a stop string ended inside these tokens: drop the tokens after it
            drop = keep - stop_at
            del state.generated[len(state.generated) - drop:]
            new_tokens, sources, rows, finish = new_tokens[:stop_at], sources[:stop_at], rows[:stop_at], "stop"
        # the rows the tokens came from; a chain's are the first ones, a view instead of a copy
        chosen = slice(0, len(rows)) if rows == list(range(len(rows))) else rows
        row_probs = probs[chosen]
        picked = row_probs.gather(1, torch.tensor(new_tokens, device=probs.device)[:, None])
        top_values, top_ids = top_k(row_probs, TOP_ALTERNATIVES)
        entropy = self.sampler.entropy(logits[chosen], row_probs, top_ids[:, :1])
        # One host transfer for all the event reports (on a GPU each transfer waits for the device): per token
        # its log-probability, entropy, and top alternatives' probabilities and ids (float32: exact below 2^24).
        summary = torch.cat([picked.clamp_min(1e-30).log(), entropy, top_values, top_ids.to(top_values.dtype)],
                            dim=1).tolist()
        k = TOP_ALTERNATIVES
        first_pos = len(state.prompt_ids) + len(state.generated) - len(new_tokens)
        end = time.perf_counter_ns()
        return StepEvent(
            step=state.step, tokens=new_tokens, sources=sources,
            logprobs=[row[0] for row in summary], entropies=[row[1] for row in summary],
            alternatives=[list(zip(map(int, row[2 + k:]), row[2: 2 + k])) for row in summary],
            positions=list(range(first_pos, first_pos + len(new_tokens))), text=added, tree=tree,
            draft_ns=draft_ns, verify_ns=verify_ns, accept_ns=end - t_verified, elapsed_ns=end - start,
            finish_reason=finish, target_argmax=[int(row[2 + k]) for row in summary],
        )

    def _record_cache(self, event: StepEvent, state: DecodeState) -> None:
        """What the cache holds now: bytes, tokens per layer, stats (kept positions on sampled steps)."""
        cache = state.cache
        context = len(state.prompt_ids) + len(state.generated) - 1  # the last token is pending, not cached
        event.cache_bytes, event.cache_live_bytes = cache.allocated_bytes(), cache.nbytes()
        event.cache_off_bytes = cache.offloaded_bytes()
        event.cache_moved_bytes, event.cache_moved_ns = cache.moved()
        event.cache_tokens = cache.tokens_per_layer()
        event.cache_stats = cache_stats(cache, context, any(p.simulated for p in self.policies),
                                        kept_sampled(state.step, event.finish_reason is not None))


def _step_embeds(model, tree: DraftTree, tree_tokens: torch.Tensor) -> torch.Tensor | None:
    """The step's input vectors when the tree's aux block brings its own (trained prompt tokens), else None."""
    if tree.aux is None or tree.aux.embeds is None:
        return None
    main = model.embed(tree_tokens[: len(tree) + 1])
    return torch.cat([main, tree.aux.embeds.to(main.dtype)])


def _whole_forwards(model) -> int:
    """Forwards the model has run through all of its layers (LlamaModel counts them; 0 for other models)."""
    return getattr(model, "whole_forwards", 0)


def _tree_record(tree: DraftTree, accepted: list[int], probs: torch.Tensor) -> TreeRecord:
    rows = torch.tensor([p + 1 for p in tree.parents], device=probs.device)
    tokens = torch.tensor(tree.tokens, device=probs.device)
    target = probs[rows, tokens].tolist()
    if tree.draft_probs is not None:
        draft = tree.draft_probs.gather(1, tokens[:, None].to(tree.draft_probs.device))[:, 0].tolist()
    else:
        draft = [None] * len(tree)
    kept = set(accepted)
    return TreeRecord(list(tree.tokens), list(tree.parents), tree.depths(), draft, target,
                      [i in kept for i in range(len(tree))])


class _TextStream:
    """Incremental detokenization with stop-string detection.

    Each token's text is the difference between decoding a short window ending in it and the same window
    without it (tokenizers merge bytes and spaces across tokens), so a step costs the same however long
    the output. Text is held back while it ends in an incomplete character.
    """

    def __init__(self, detokenize: Callable[[list[int]], str], stop: list[str]):
        self.detokenize, self.stop = detokenize, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.window = 0  # first id of the decoding window
        self.read = 0  # ids before this one have had their text emitted

    def _pending_text(self) -> str:
        full = self.detokenize(self.ids[self.window:])
        return full[len(self.detokenize(self.ids[self.window:self.read])):]

    def extend(self, new_ids: list[int]) -> tuple[str, int | None]:
        """Add tokens; return (their text, count of new_ids kept if a stop string completed, else None)."""
        added = ""
        for i, token in enumerate(new_ids):
            self.ids.append(token)
            piece = self._pending_text()
            if piece.endswith("\ufffd"):
                continue
            self.window, self.read = self.read, len(self.ids)
            added += piece
            self.text += piece
            for stop in self.stop:
                at = self.text.find(stop, max(0, len(self.text) - len(piece) - len(stop) + 1))
                if at >= 0:
                    overflow = len(self.text) - (at + len(stop))
                    self.text = self.text[: at + len(stop)]
                    return added[: len(added) - overflow], i + 1
        return added, None

    def flush(self) -> str:
        """Whatever text was held back; called on the last step."""
        piece = self._pending_text()
        self.text += piece
        self.window = self.read = len(self.ids)
        return piece


def _sync(device: torch.device) -> None:
    """Wait for the device so that per-step timings measure work, not queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
