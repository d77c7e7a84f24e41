"""Checks for the teaching labs (`notebooks/`): each `check_...` runs a student's answer against the project's
own implementation or a property it must have, and says what is wrong in plain words.

A check prints one line starting with a tick when the answer is right and raises `LabCheckError` (an
AssertionError) with an explanation otherwise. The labs' solution copies (`notebooks/solutions/`) run every
check in `make test`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from workbench.cache.quantized import dequantize_minmax, quantize_minmax
from workbench.compression.int4 import quantize_rtn_int4
from workbench.decoding.prompt_lookup import PromptLookup
from workbench.engine import Engine
from workbench.sampling import Sampler
from workbench.spec import RunSpec, TechniqueSpec
from workbench.testing import exact_marginals, sampled, tiny_model, tv, tv_bound


class LabCheckError(AssertionError):
    """An exercise's answer is wrong; the message says how."""


def _fail(message: str) -> None:
    raise LabCheckError(message)


def _ok(message: str) -> None:
    print(f"\u2714 {message}")


# Lab 1: the decoding loop


def check_processed_probs(fn: Callable[[torch.Tensor, float, int, float], torch.Tensor]) -> None:
    """fn(logits [V], temperature, top_k, top_p) -> probabilities [V], as `Sampler.probs` computes them."""
    gen = torch.Generator().manual_seed(0)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 5, 1.0), (0.8, 0, 0.9), (0.7, 10, 0.8)]:
        logits = torch.randn(50, generator=gen) * 3
        want = Sampler(temperature=temperature, top_k=top_k, top_p=top_p).probs(logits)
        got = fn(logits.clone(), temperature, top_k, top_p)
        case = f"temperature={temperature}, top_k={top_k}, top_p={top_p}"
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            _fail(f"with {case} your function should return a tensor of {want.shape[0]} probabilities, "
                  f"got {type(got).__name__} {getattr(got, 'shape', '')}")
        got = got.float()
        if abs(float(got.sum()) - 1) > 1e-4:
            _fail(f"with {case} your probabilities sum to {float(got.sum()):.4f}, not 1: normalise after filtering")
        kept, want_kept = int((got > 0).sum()), int((want > 0).sum())
        if kept != want_kept:
            _fail(f"with {case} you keep {kept} tokens, the reference keeps {want_kept}: apply temperature first, "
                  "then keep the top_k largest logits, then the smallest set of tokens whose probability "
                  "reaches top_p (the token that crosses top_p stays)")
        if not torch.allclose(got, want, atol=1e-5):
            i = int((got - want).abs().argmax())
            _fail(f"with {case} token {i} gets probability {float(got[i]):.5f}, the reference "
                  f"{float(want[i]):.5f}: did you divide the logits by the temperature before the softmax?")
    _ok("processed probabilities match workbench.sampling.Sampler.probs for every setting tried")


def _greedy_ok(model: Any, prompt_ids: list[int], tokens: list[int], n: int, what: str) -> None:
    if not isinstance(tokens, list | tuple) or len(tokens) != n or not all(isinstance(t, int) for t in tokens):
        _fail(f"{what} should return a list of {n} token ids (Python ints), got {tokens!r:.80}")
    ids = torch.tensor(list(prompt_ids) + list(tokens))
    with torch.inference_mode():
        logits = model(ids, torch.arange(len(ids))).logits.float()
    for i, t in enumerate(tokens):
        row = logits[len(prompt_ids) - 1 + i]
        gap = float(row.max() - row[t])
        if gap > 0.15:  # a near tie, within bfloat16 rounding between a cached and a full forward, is fine
            _fail(f"{what}: token {i} is {t}, but the model's most likely token there is {int(row.argmax())} "
                  f"(logit higher by {gap:.3f}); greedy decoding takes the argmax of the last row of logits")


class CountingModel:
    """Wraps a model and counts the tokens each forward runs (to see whether a loop uses its cache)."""

    def __init__(self, model: Any):
        self.model, self.calls = model, []

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(int(tokens.shape[0]))
        return self.model(tokens, positions, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def check_greedy(fn: Callable[[Any, list[int], int], list[int]], model: Any, prompt_ids: list[int], n: int = 8) -> None:
    """fn(model, prompt_ids, n) -> n greedy tokens, recomputing the whole sequence each step."""
    _greedy_ok(model, prompt_ids, fn(model, list(prompt_ids), n), n, "greedy_decode")
    _ok(f"greedy_decode picks the argmax at each of its {n} tokens")


def check_greedy_cached(fn: Callable[[Any, list[int], int], list[int]], model: Any, prompt_ids: list[int],
                        n: int = 8) -> None:
    """fn(model, prompt_ids, n) with a KV cache: one prefill, then one token per forward."""
    counting = CountingModel(model)
    tokens = fn(counting, list(prompt_ids), n)
    _greedy_ok(model, prompt_ids, tokens, n, "greedy_decode_cached")
    want = [len(prompt_ids)] + [1] * (n - 1)
    if counting.calls != want:
        _fail(f"with a cache the model should run the prompt once ({len(prompt_ids)} tokens), then one new token "
              f"per step: {want[:4]}..., but your forwards ran {counting.calls[:6]} tokens; pass the cache to "
              "every forward and feed only the newest token")
    _ok(f"greedy_decode_cached gives greedy tokens with {n} forwards: the prompt once, then one token each")


# Lab 2: speculative decoding


def check_verify(fn: Callable[[torch.Tensor, torch.Tensor, int, torch.Generator], int], trials: int = 20000) -> None:
    """fn(p, q, x, generator) -> the committed token, for a draft x ~ q: must be distributed as p."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.4, 0.3, 0.1, 0.1])
    gen = torch.Generator().manual_seed(0)
    drafts = torch.multinomial(q, trials, replacement=True, generator=gen).tolist()
    counts, kept = torch.zeros(5), 0
    for x in drafts:
        t = fn(p, q, x, gen)
        if not isinstance(t, int) or not 0 <= t < 5:
            _fail(f"your rule should return a token id (an int in 0..4), got {t!r}")
        counts[t] += 1
        kept += t == x
    empirical = counts / trials
    tv = 0.5 * float((empirical - p).abs().sum())
    bound = math.sqrt((5 * math.log(2) + math.log(1e6)) / (2 * trials))
    if tv > bound:
        worst = int((empirical - p).abs().argmax())
        _fail(f"the tokens your rule commits are not distributed as the target p: total variation {tv:.3f} (sampling "
              f"noise stays below {bound:.3f}); token {worst} comes out {float(empirical[worst]):.3f} of the time "
              f"but p gives it {float(p[worst]):.3f}. Accept x with probability min(1, p[x]/q[x]); on a rejection "
              "sample from max(0, p - q), normalised")
    rate, want = kept / trials, float(torch.minimum(p, q).sum())
    if abs(rate - want) > 4 * math.sqrt(want * (1 - want) / trials) + 0.01:
        _fail(f"the output follows p, but the draft is kept {rate:.3f} of the time instead of sum(min(p, q)) = "
              f"{want:.3f}: the rule should accept whenever it can (and a rejection must not return x itself)")
    _ok(f"over {trials} drafts the committed tokens follow p (TV {tv:.4f} < {bound:.4f}) and the draft is kept "
        f"{rate:.3f} of the time (theory {want:.3f})")


def check_expected_tokens(fn: Callable[[float, int], float]) -> None:
    """fn(alpha, k) -> expected tokens per target forward with k drafts accepted i.i.d. with probability alpha."""
    for alpha, k in [(0.0, 4), (0.5, 1), (0.5, 4), (0.8, 8), (0.99, 3), (1.0, 5)]:
        want = k + 1 if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
        got = fn(alpha, k)
        if not isinstance(got, int | float) or abs(got - want) > 1e-6:
            _fail(f"for alpha={alpha}, k={k} you give {got!r}, expected {want:.4f}: the step commits the accepted "
                  "prefix plus one token, and sum_{i=0..k} alpha^i = (1 - alpha^(k+1)) / (1 - alpha)"
                  + (" (at alpha = 1 every draft is accepted: k + 1)" if alpha == 1 else ""))
    _ok("expected tokens per step match (1 - alpha^(k+1)) / (1 - alpha), and k + 1 at alpha = 1")


# Lab 3: drafters without a draft model


def check_ngram_lookup(fn: Callable[[list[int], int, int], list[int]]) -> None:
    """fn(tokens, max_ngram, k) -> the draft prompt lookup proposes (longest n-gram first, first occurrence)."""
    gen = torch.Generator().manual_seed(1)
    for case in range(200):
        tokens = torch.randint(0, 4, (int(torch.randint(2, 30, (1,), generator=gen)),), generator=gen).tolist()
        max_ngram, k = 1 + case % 3, 1 + case % 5
        drafter = PromptLookup(k=k, max_ngram=max_ngram, min_ngram=1, shrink=0)
        state = SimpleNamespace(tokens=tokens)
        drafter.begin(state)
        want = drafter.propose(state).tokens
        got = fn(list(tokens), max_ngram, k)
        if list(got) != want:
            _fail(f"for tokens {tokens}, max_ngram={max_ngram}, k={k} you draft {list(got)}, prompt lookup drafts "
                  f"{want}: try n = max_ngram down to 1, find the FIRST earlier occurrence of the last n tokens (not "
                  "the one at the end itself), and copy up to k tokens that followed it")
    _ok("ngram_lookup drafts what workbench's prompt_lookup drafts on 200 random sequences")


def check_mean_accepted(fn: Callable[[Any], float], traces: list[Any]) -> None:
    """fn(trace) -> generated tokens per target forward, from the trace's events."""
    for trace in traces:
        want, got = trace.summary()["mean_accepted_length"], fn(trace)
        if not isinstance(got, int | float) or abs(got - want) > 1e-9:
            _fail(f"for the {trace.spec.decode.name} run you give {got!r}, the metric is {want:.4f}: count every "
                  "committed token (accepted drafts and the bonus) over every event, the prefill included")
    _ok(f"mean accepted length matches workbench.metrics on {len(traces)} traces")


# Lab 4: the KV cache under a budget


def check_quantize_keys(fn: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """fn(k [tokens, channels], bits) -> (codes, scale [1, channels], minimum [1, channels]): KIVI's keys."""
    k = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 8, 64)
    for bits in (2, 4):
        codes, scale, mn = fn(k.clone(), bits)
        if scale.shape != (1, 64) or mn.shape != (1, 64):
            _fail(f"KIVI quantizes keys per channel (over the group's tokens): scale and minimum should have shape "
                  f"[1, 64], one per channel, got {tuple(scale.shape)} and {tuple(mn.shape)}")
        if codes.shape != k.shape or int(codes.min()) < 0 or int(codes.max()) > 2**bits - 1:
            _fail(f"{bits}-bit codes should be integers in 0..{2**bits - 1}, one per element of k")
        want_codes, want_scale, want_mn = quantize_minmax(k, 0, bits)
        err = (dequantize_minmax(codes, scale, mn) - k).abs()
        want_err = (dequantize_minmax(want_codes, want_scale, want_mn) - k).abs()
        if float(err.mean()) > 1.05 * float(want_err.mean()) + 1e-4:
            _fail(f"at {bits} bits your reconstruction's mean error is {float(err.mean()):.4f}, round-to-nearest "
                  f"between each channel's minimum and maximum gives {float(want_err.mean()):.4f}: scale = "
                  f"(max - min) / (2^bits - 1), code = round((k - min) / scale)")
    _ok("keys quantized per channel with the error of workbench.cache.kivi's round-to-nearest, at 2 and 4 bits")


def check_streaming_mask(fn: Callable[[int, int, int], torch.Tensor]) -> None:
    """fn(context, sinks, window) -> bool [context]: the tokens StreamingLLM keeps."""
    for context, sinks, window in [(20, 4, 8), (10, 4, 8), (30, 0, 5), (30, 2, 0), (7, 1, 1)]:
        want = torch.zeros(context, dtype=torch.bool)
        want[:sinks] = True
        if window:
            want[-window:] = True
        got = fn(context, sinks, window)
        if not isinstance(got, torch.Tensor) or got.dtype != torch.bool or got.shape != want.shape:
            _fail(f"return a bool tensor of {context} entries, got {getattr(got, 'dtype', type(got))} "
                  f"{tuple(getattr(got, 'shape', ()))}")
        if not torch.equal(got, want):
            _fail(f"context={context}, sinks={sinks}, window={window}: you keep positions "
                  f"{got.nonzero().flatten().tolist()}, StreamingLLM keeps {want.nonzero().flatten().tolist()} "
                  "(the first `sinks` tokens and the last `window` ones; when they overlap, everything)")
    _ok("the kept-token mask matches StreamingLLM's sinks + recent window")


# Lab 5: weight compression


def check_int4(fn: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """fn(w [out, in], group) -> (codes [out, in] in 0..15, scale [out, in/group], offset [out, in/group])."""
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    codes, scale, offset = fn(w.clone(), 32)
    want_codes, want_scale, want_offset = quantize_rtn_int4(w, 32)
    if scale.shape != want_scale.shape or offset.shape != want_offset.shape:
        _fail(f"one scale and one offset per group of 32 inputs of each row: shape {tuple(want_scale.shape)}, got "
              f"{tuple(scale.shape)} and {tuple(offset.shape)}")
    if codes.shape != w.shape or int(codes.min()) < 0 or int(codes.max()) > 15:
        _fail("codes are 4-bit: integers 0..15, one per weight")
    rebuilt = (codes.float().reshape(16, 4, 32) * scale[..., None] + offset[..., None]).reshape(16, 128)
    want = (want_codes.float().reshape(16, 4, 32) * want_scale[..., None] + want_offset[..., None]).reshape(16, 128)
    err, want_err = float((rebuilt - w).abs().mean()), float((want - w).abs().mean())
    if err > 1.05 * want_err + 1e-6:
        _fail(f"mean reconstruction error {err:.5f}, round-to-nearest gives {want_err:.5f}: w = scale * code + "
              "offset with offset = the group's minimum and scale = (max - min) / 15")
    _ok(f"int4 codes reconstruct w with error {err:.5f} (workbench's int4: {want_err:.5f})")


# Lab 6: SQL


def check_sql(rows: list[dict[str, Any]], traces: list[Any]) -> None:
    """rows: the student's query result as dicts with `decode` and `mean_accepted_length` per decoding name."""
    want: dict[str, list[float]] = {}
    for t in traces:
        want.setdefault(t.spec.decode.name, []).append(t.summary()["mean_accepted_length"])
    got = {r.get("decode"): r.get("mean_accepted_length") for r in rows}
    if set(got) != set(want):
        _fail(f"your query returns decodes {sorted(map(str, got))}, the runs used {sorted(want)}: select "
              "decode_name AS decode and GROUP BY it")
    for name, values in want.items():
        mean = sum(values) / len(values)
        if got[name] is None or abs(got[name] - mean) > 1e-6:
            _fail(f"for {name} you get {got[name]!r}, the runs' mean accepted length is {mean:.4f}: average the "
                  "run_summary column mean_accepted_length")
    _ok(f"the query's averages match the traces for {len(want)} decoding methods")


# Lab 7: your own drafter


def check_drafter(name: str, trials: int = 250) -> dict[str, float]:
    """A drafter registered as `name` keeps the target's greedy output and distribution (workbench.testing's
    harness, on its tiny model); returns the measured total variation, its bound and the drafts accepted."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model is fastest on one thread; more only wait on each other
    try:
        model = tiny_model()
        for seed in range(3):
            prompt = torch.randint(0, 8, (12,), generator=torch.Generator().manual_seed(seed)).tolist()
            outs = []
            for decode in ("plain", name):
                engine = Engine(model, RunSpec(max_new_tokens=12, decode=TechniqueSpec(decode, {})))
                outs.append([t for e in engine.run(prompt) for t in e.tokens])
            if outs[0] != outs[1]:
                _fail(f"greedy output differs from plain decoding on prompt {prompt}: plain {outs[0]}, yours "
                      f"{outs[1]}; a drafter only proposes, so check what `propose` returns (a DraftTree of ids)")
        ours, accepted = sampled(model, name, trials, params={})
        distance = float(tv(ours, exact_marginals(model)).max())
    finally:
        torch.set_num_threads(threads)
    bound = tv_bound(trials, 4)
    if distance > bound:
        _fail(f"sampled output is off the target's distribution: total variation {distance:.3f} > {bound:.3f}")
    if accepted == 0:
        _fail("no draft was ever accepted on the tiny model: does your drafter propose anything?")
    _ok(f"{name}: greedy output equals plain decoding; sampled output follows the target (TV {distance:.3f} < "
        f"{bound:.3f}, {accepted} drafts accepted over {trials} runs)")
    return {"tv": distance, "bound": bound, "accepted": accepted}
