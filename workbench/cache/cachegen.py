"""CacheGen: a prompt's KV cache encoded into a compact bitstream (a file), and decoded into a cache instead of
prefilling the prompt again."""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import constriction
import numpy as np
import torch

from workbench.cache.base import CachePolicy, KVCache
from workbench.cache.dense import DenseLayerCache
from workbench.errors import SpecError
from workbench.registry import param, register

MAGIC = b"WBKVGEN4"
SIDE = 3  # per head and channel, float16: the anchors' mean, the anchor step, the delta step


def layer_bits(layer: int, layers: int, bits: int, shallow: int = 1) -> int:
    """Resolution of `layer`'s deltas: the first third of the layers gets bits + shallow, the others `bits`
    (CacheGen's layer-wise sensitivity: errors in shallow layers reach every later layer)."""
    return bits + shallow if 3 * layer < layers else bits


def limits(bits: int) -> tuple[int, int]:
    """Largest |symbol| of the anchors and of the deltas: about 8 standard deviations at their steps."""
    return 2 ** (bits + 3), 2 ** (bits + 1)


def _table(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    """Symbol frequencies scaled to one byte each (a symbol that occurs never gets 0): what the file stores and
    both coder and decoder build their distribution from."""
    counts = np.bincount(symbols, minlength=alphabet).astype(np.float64)
    return np.where(counts > 0, np.maximum(1, np.round(255 * counts / max(counts.max(), 1))), 0).astype(np.uint8)


def _model(table: np.ndarray):
    probs = table.astype(np.float64)
    return constriction.stream.model.Categorical(probs / probs.sum(), perfect=False)


def _quantize(t: torch.Tensor, step: torch.Tensor, limit: int) -> np.ndarray:
    """Symbols 0 .. 2 * limit (the rounded t / step, offset by limit), int32."""
    return ((t / step).round().clamp(-limit, limit) + limit).to(torch.int32).numpy()


def encode_tensor(x: torch.Tensor, group: int, bits: int, encoder, sinks: int = 0) -> bytes:
    """x [heads, n, dim] float32 -> side information (the sinks, steps, means, frequency tables); symbols go to
    `encoder`.

    The first `sinks` tokens are kept in float16 in the side information: every later token attends to them
    heavily (attention sinks), so a quantization error there reaches every query.

    Token-wise locality: tokens come in groups of `group`; each group's first token (the anchor) is coded as its
    difference from the anchors' mean, the others as their difference from the group's reconstructed anchor.
    Both are quantized uniformly with a step per head and channel of std / 2**(b - 2) (b = bits + 2 for the
    anchors, `bits` for the deltas), then range-coded: the deltas of each head and channel with that channel's
    own frequencies, the anchors (few per channel) with one table for the tensor."""
    sinks = max(0, min(sinks, x.shape[1] - 1))  # at least one token is coded
    sink_bytes = x[:, :sinks].half().numpy().tobytes()
    x = x[:, sinks:]
    heads, n, dim = x.shape
    a_limit, d_limit = limits(bits)
    anchors = x[:, ::group]
    mean = _half(anchors.mean(1))
    a_step = _half(((anchors - mean[:, None]).std(1, unbiased=False) * 2.0 ** -bits).clamp_min(1e-6))
    a_codes = _quantize(anchors - mean[:, None], a_step[:, None], a_limit)
    a_hat = (torch.from_numpy(a_codes).float() - a_limit) * a_step[:, None] + mean[:, None]
    is_anchor = _anchor_mask(n, group)
    deltas = (x - a_hat.repeat_interleave(group, 1)[:, :n])[:, ~is_anchor]
    d_step = _half((deltas.std(1, unbiased=False) * 2.0 ** (2 - bits)).clamp_min(1e-6)
                   if deltas.shape[1] else torch.ones_like(mean))
    d_codes = _quantize(deltas, d_step[:, None], d_limit)
    tables = [_table(a_codes.reshape(-1), 2 * a_limit + 1)]
    encoder.encode(a_codes.reshape(-1), _model(tables[0]))
    for h in range(heads):
        for c in range(dim):
            tables.append(_table(d_codes[h, :, c], 2 * d_limit + 1))
            if deltas.shape[1]:  # a group of one token (a one-token prompt) has no deltas
                encoder.encode(np.ascontiguousarray(d_codes[h, :, c]), _model(tables[-1]))
    side = torch.stack([mean, a_step, d_step], 1).half().numpy().tobytes()
    return struct.pack("<BH", bits, sinks) + sink_bytes + side + np.concatenate(tables).tobytes()


def decode_tensor(decoder, side: bytes, heads: int, n: int, dim: int, group: int) -> torch.Tensor:
    """The inverse of encode_tensor: [heads, n, dim] float32."""
    bits, sinks = struct.unpack("<BH", side[:3])
    at = 3 + 2 * heads * sinks * dim
    sink_tokens = np.frombuffer(side[3:at], np.float16).reshape(heads, sinks, dim).astype(np.float32)
    side, n = side[at:], n - sinks
    a_limit, d_limit = limits(bits)
    at = 2 * heads * SIDE * dim
    # numpy, not torch, from here: many small operations, which torch's thread pool slows on a busy machine
    mean, a_step, d_step = np.frombuffer(side[:at], np.float16).reshape(heads, SIDE, dim).astype(np.float32)\
        .transpose(1, 0, 2)
    tables = np.frombuffer(side[at:], np.uint8)
    is_anchor = _anchor_mask(n, group).numpy()
    n_anchor = int(is_anchor.sum())
    a_codes = decoder.decode(_model(tables[: 2 * a_limit + 1]), heads * n_anchor * dim)
    at = 2 * a_limit + 1
    width = 2 * d_limit + 1
    d_codes = np.empty((heads, n - n_anchor, dim), np.int32)
    for h in range(heads):
        for c in range(dim):
            if n > n_anchor:
                d_codes[h, :, c] = decoder.decode(_model(tables[at: at + width]), n - n_anchor)
            at += width
    anchors = (a_codes.reshape(heads, n_anchor, dim).astype(np.float32) - a_limit) * a_step[:, None] + mean[:, None]
    x = np.repeat(anchors, group, axis=1)[:, :n]
    x[:, ~is_anchor] += (d_codes.astype(np.float32) - d_limit) * d_step[:, None]
    return torch.from_numpy(np.concatenate([sink_tokens, x], 1))


def _half(t: torch.Tensor) -> torch.Tensor:
    """t as the decoder will read it back (float16)."""
    return t.half().float()


def _anchor_mask(n: int, group: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[::group] = True
    return mask


def encode_cache(cache: KVCache, tokens: list[int], group: int, bits: int, model_key: dict, key_bits: int = 0,
                 shallow: int = 1, sinks: int = 0) -> bytes:
    """The committed prompt held by every (dense) layer of `cache` as one CacheGen bitstream: values' deltas at
    `bits`, keys' at `key_bits` (0: `bits`), the first third of the layers `shallow` bits finer, the first
    `sinks` tokens in float16."""
    header = {"tokens": tokens, "group": group, "bits": [], "model": model_key, "layers": []}
    blobs = []
    for i, layer in enumerate(cache.layers):
        k, v = (t[:, : len(tokens)].float().cpu() for t in layer.view())
        kb, vb = (layer_bits(i, len(cache.layers), b, shallow) for b in (key_bits or bits, bits))
        encoder = constriction.stream.queue.RangeEncoder()
        sides = [encode_tensor(x, group, b, encoder, sinks) for x, b in ((k, kb), (v, vb))]
        stream = encoder.get_compressed().tobytes()
        header["bits"].append([kb, vb])
        header["layers"].append([len(stream), *map(len, sides)])
        blobs += [stream, *sides]
    head = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + b"".join(blobs)


def decode_cache(data: bytes, heads: int, dim: int) -> tuple[dict, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A bitstream from encode_cache -> (its header, per layer (k, v) [heads, n, dim] float32)."""
    if not data.startswith(MAGIC):
        raise SpecError("cachegen: this file is not a CacheGen KV file (it does not start with the format's magic "
                        "bytes); make one with `workbench generate --kv-save FILE`")
    (size,) = struct.unpack("<I", data[len(MAGIC): len(MAGIC) + 4])
    at = len(MAGIC) + 4 + size
    header = json.loads(data[len(MAGIC) + 4: at])
    n, group = len(header["tokens"]), header["group"]
    layers = []
    for lengths in header["layers"]:
        parts = []
        for length in lengths:
            parts.append(data[at: at + length])
            at += length
        stream, k_side, v_side = parts
        decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(stream, np.uint32))
        layers.append(tuple(decode_tensor(decoder, side, heads, n, dim, group) for side in (k_side, v_side)))
    return header, layers


@register("cache", "cachegen", lossless=False)
@dataclass
class CacheGenPolicy(CachePolicy):
    """CacheGen: the prompt's KV cache as a compact bitstream, stored and loaded instead of recomputed.

    "CacheGen: KV Cache Compression and Streaming for Fast Large Language Model Serving" (arXiv 2310.07240).
    The encoder uses the paper's three observations: token-wise locality (tokens in groups of `group`; each
    group's first token is an anchor, coded finely, the others as deltas from it), layer-wise sensitivity (the
    first third of the layers gets `shallow` bits more), and a distribution per layer and channel (each head and
    channel's deltas are range-coded with their own empirical frequencies, stored in the file at a byte per
    symbol; the anchors, a tenth of the tokens, share one table per tensor). `save=FILE` writes the prompt's
    cache after the prefill; `load=FILE` (`workbench generate --kv-from FILE`) decodes a file whose tokens begin
    the prompt into the cache, and only the rest of the prompt is prefilled; with neither, the prompt's cache is
    encoded and decoded in place after the prefill (the quality a user of the files would get).
    Added to the paper: the first `sinks` tokens are stored in float16 (every later query attends to these
    attention sinks, so their error costs most: on this model keeping 4 takes the perplexity cost from +3.4% to
    +0.6% for 0.2 points of file). The defaults depart from the paper's split where this model's measurements do
    (docs/cache.md): the keys, not the values, carry the perplexity cost, and the shallow layers are not the
    sensitive ones, so the keys get a bit more (`key_bits=4`) and the first third none (`shallow=0`): 24.9% of
    the float16 cache at +0.6% perplexity, against 23.6% at +5.8% with the paper's split (`key_bits=3,shallow=1,
    sinks=0`). Left out: the paper's chunked streaming with a bitrate chosen per chunk from the bandwidth, and
    its GPU decoder.
    """

    bits: int = param(3, "resolution of the values' deltas: a step of std / 2**(bits - 2) per channel",
                      min=1, max=10)
    key_bits: int = param(4, "resolution of the keys' deltas, as `bits` (0: the same as `bits`)", min=0, max=10)
    shallow: int = param(0, "extra bits for the first third of the layers (CacheGen's layer-wise sensitivity; "
                            "1 is the paper's split)", min=0, max=4)
    sinks: int = param(4, "first tokens kept in float16: every later token attends to these attention sinks, so "
                          "their quantization error costs the most", min=0, max=64)
    group: int = param(10, "tokens per group: the first is the anchor, the others deltas from it", min=2, max=256)
    save: str = param("", "write the prompt's encoded cache to this file after the prefill ('' = do not)")
    load: str = param("", "read the prompt's leading tokens' cache from this file instead of prefilling them")
    file_bytes: int = field(default=0, init=False)  # size of the last bitstream written or read
    raw_fp16_bytes: int = field(default=0, init=False)  # the same tokens' K and V in float16
    load_s: float = field(default=0.0, init=False)  # decoding the file into the cache
    loaded_tokens: int = field(default=0, init=False)
    _prompt: list[int] = field(default_factory=list, init=False, repr=False)
    _model_key: dict = field(default_factory=dict, init=False, repr=False)

    def check(self) -> None:
        if self.load and not Path(self.load).is_file():
            raise SpecError(f"cachegen: load={self.load!r} is not a file; give a file written by "
                            "`workbench generate --kv-save FILE`")

    def prepare(self, model, tokenizer, memory) -> None:
        c = model.config
        self._model_key = {"layers": c.num_layers, "kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
                           "vocab": c.vocab_size, "hidden": c.hidden_size,
                           "probe": round(float(model.embed.weight[:64].float().sum()), 4)}

    def on_cache_built(self, cache: KVCache) -> None:
        for i, layer in enumerate(cache.layers):
            if type(layer) is not DenseLayerCache:
                raise SpecError(f"cachegen encodes and loads a dense cache, but layer {i} holds "
                                f"{type(layer).__name__}; use cachegen without another storage form")

    def load_prefix(self, cache: KVCache, prompt_ids: list[int]) -> int:
        self._prompt = list(prompt_ids)
        if not self.load:
            return 0
        start = time.perf_counter()
        data = Path(self.load).read_bytes()
        layer = cache.layers[0]
        header, layers = decode_cache(data, layer.k.shape[0], layer.head_dim)
        if header["model"] != self._model_key:
            raise SpecError(f"cachegen: {self.load} was encoded from another model ({header['model']}); this run's "
                            f"model is {self._model_key}")
        tokens = header["tokens"]
        if prompt_ids[: len(tokens)] != tokens[: len(prompt_ids)]:
            raise SpecError(f"cachegen: the {len(tokens)} tokens encoded in {self.load} do not begin this prompt; "
                            "give the same document (and append to it)")
        n = min(len(tokens), len(prompt_ids) - 1)  # at least one prompt token is prefilled: it yields the logits
        positions = torch.arange(n, device=layer.k.device)
        for layer, (k, v) in zip(cache.layers, layers):
            layer.append(k[:, :n].to(layer.k), v[:, :n].to(layer.v), positions)
        cache.commit()
        self.file_bytes, self.loaded_tokens = len(data), n
        self.raw_fp16_bytes = _raw_fp16(cache, len(tokens))
        self.load_s = time.perf_counter() - start
        return n

    def on_prefill_end(self, cache: KVCache) -> None:
        if self.load:
            return
        data = encode_cache(cache, self._prompt[: cache.layers[0].n_committed], self.group, self.bits,
                            self._model_key, key_bits=self.key_bits, shallow=self.shallow, sinks=self.sinks)
        self.file_bytes, self.raw_fp16_bytes = len(data), _raw_fp16(cache, cache.layers[0].n_committed)
        if self.save:
            Path(self.save).write_bytes(data)
            return
        layer0 = cache.layers[0]
        _, layers = decode_cache(data, layer0.k.shape[0], layer0.head_dim)
        for layer, (k, v) in zip(cache.layers, layers):  # the round trip: what a loaded file would hold
            n = k.shape[1]
            layer.k[:, :n], layer.v[:, :n] = k.to(layer.k), v.to(layer.v)


def _raw_fp16(cache: KVCache, tokens: int) -> int:
    layer = cache.layers[0]
    return len(cache.layers) * 2 * layer.k.shape[0] * tokens * layer.head_dim * 2
