"""The shared mechanism of compressed storage forms: committed tokens encoded by a codec, a raw tail.

A `CompressedLayerCache` holds two regions. Slots 0..N-1 are committed tokens in the codec's compressed form;
the slots after them are a `DenseLayerCache` (the raw tail) holding the full-precision residual window and
every uncommitted token (drafts, tree nodes, a self-draft's scratch). Drafts therefore stay raw until they
are accepted, and commit/rollback/tree offsets act on the raw tail alone. When the committed part of the
raw tail reaches `residual` tokens (and at least one group), every whole group of `group` tokens in it is
encoded and moved to the compressed region (KIVI's flush: the residual window fills, then is quantized).

A codec encodes groups of tokens: per-token fields ([kv_heads, tokens, ...]: codes, per-token scales,
bitmaps, low-rank rows) and per-group fields ([kv_heads, groups, ...]: per-channel key scales, low-rank
bases). Each compressed token knows its group implicitly (slot // group) until an eviction moves tokens;
then a group index (int16, counted in the bytes) is held. `keep` gathers per-token fields and never
re-encodes, except after a per-head keep where heads keep different numbers of compressed tokens: the extra
ones are decoded into the raw tail (and re-encoded at the next flush). Positions of compressed tokens are
int32, held once per layer while every head holds the same tokens and per head after a per-head keep.

Raw heads (a storage form per kv head). Chosen kv heads of a layer (`raw_heads`) hold their committed
tokens uncompressed, in the model's dtype, while the layer's other heads use the codec. Heads differ in how
much compression hurts: retrieval ("heavy") heads that copy from far back in the context are the most
sensitive to KV error, which is why DuoAttention (arXiv 2410.10819) and RazorAttention (arXiv 2407.15891)
treat heads differently. Here the user chooses the heads (the per-head byte heatmap of the app shows what each
costs); nothing is calibrated. The codec encodes only the other heads, and the raw heads' K/V sit beside the
codec's fields in the same slots, so positions, eviction, flushes and the raw tail stay one mechanism.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from workbench.cache.base import CachePolicy, LayerCache
from workbench.cache.dense import DenseLayerCache

if TYPE_CHECKING:
    from workbench.models.config import ModelConfig

Fields = dict[str, torch.Tensor]
RAW_SPARE = 16  # raw-tail slots beyond the residual window: one step's tokens (a short draft) without growing


class Codec(ABC):
    """Encodes groups of `group` tokens of one layer's keys and values."""

    group: int = 1
    attention_operation: str | None = None  # the layer's `attention_operation` (a kernel reading this layout)

    @abstractmethod
    def encode(self, k: torch.Tensor, v: torch.Tensor) -> tuple[Fields, Fields]:
        """k, v: [kv_heads, groups, group, dim]. Returns per-token fields [kv_heads, groups * group, ...] and
        per-group fields [kv_heads, groups, ...]."""

    @abstractmethod
    def decode(self, tok: Fields, grp: Fields) -> tuple[torch.Tensor, torch.Tensor]:
        """tok: per-token fields [kv_heads, n, ...]; grp: each token's group fields [kv_heads, n, ...].
        Returns k, v [kv_heads, n, dim] in float32."""

    def extra_nbytes_per_head(self) -> int:
        """Bytes per head the codec itself holds (a channel permutation...)."""
        return 0

    def held_fraction(self) -> float:
        """Fraction of a stored token's K/V elements actually held (below 1 for pruned forms)."""
        return 1.0


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last axis into uint8 (bits in 1, 2, 4, 8)."""
    per = 8 // bits
    codes = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.uint8, device=codes.device) * bits
    return (codes << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)


def quantize_minmax(x: torch.Tensor, dim: int, bits: int, ignore: torch.Tensor | None = None):
    """Asymmetric round-to-nearest along `dim`: codes (uint8, unpacked), scale and minimum (float16, `dim`
    kept as size 1). `ignore` (bool, like x) marks entries left out of the range (outliers held apart)."""
    x = x.float()
    lo = x if ignore is None else x.masked_fill(ignore, float("inf"))
    hi = x if ignore is None else x.masked_fill(ignore, float("-inf"))
    mn = lo.amin(dim, keepdim=True).to(torch.float16)
    scale = ((hi.amax(dim, keepdim=True) - mn.float()) / (2**bits - 1)).clamp_min(1e-6).to(torch.float16)
    codes = ((x - mn.float()) / scale.float()).round_().clamp_(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, mn


def dequantize_minmax(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float() + mn.float()


def _nbytes_per_head(t: torch.Tensor | None, heads: int) -> int:
    """Bytes of t per head when `heads` heads share it (one row each, or one row for all)."""
    return 0 if t is None or not heads else t.numel() * t.element_size() // heads


class CompressedLayerCache(LayerCache):
    def __init__(self, codec: Codec, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 capacity: int, residual: int, raw_heads: Iterable[int] = ()):
        self.codec, self.kv_heads, self.head_dim, self.dtype = codec, kv_heads, head_dim, dtype
        self.residual = residual
        # Heads whose committed tokens stay in the model's dtype (`full`, [n_raw_heads, N, dim] "k" and "v"),
        # and the heads the codec encodes (`tok`/`grp` rows are these heads only).
        full = sorted(set(raw_heads))
        self.full_heads = torch.tensor(full, dtype=torch.long, device=device)
        self.coded_heads = torch.tensor([h for h in range(kv_heads) if h not in full], dtype=torch.long,
                                        device=device)
        self.n_full, self.n_coded = len(full), kv_heads - len(full)
        self._full_list, self._coded_list = full, self.coded_heads.tolist()  # for the host-side byte counts
        self.full: Fields = {}
        self.device = device
        # The raw tail holds at most the residual window (or the group being filled) and one step's new tokens:
        # sized for that, grown (doubling) for a prompt or a large tree, and shrunk back at the next flush.
        self.raw_floor = max(residual, codec.group) + RAW_SPARE
        self.raw = self._new_raw(min(capacity, self.raw_floor))
        self.tok: Fields = {}
        self.grp: Fields = {}
        self.gidx: torch.Tensor | None = None  # [1 or coded heads, N] int16; None: slot // group
        self._n = 0  # compressed tokens
        # Their positions: None while they are cpos_start, cpos_start + 1, ... in every head (nothing held),
        # else [1 or kv_heads, N] int32.
        self.cpos: torch.Tensor | None = None
        self.cpos_start = 0

    @property
    def attention_operation(self) -> str | None:  # type: ignore[override]
        return self.codec.attention_operation

    def _new_raw(self, capacity: int) -> DenseLayerCache:
        raw = DenseLayerCache(self.kv_heads, self.head_dim, self.dtype, self.device, capacity)
        raw.floor, raw.spare = self.raw_floor, 0  # its keep() shrinks it back to the window after a flush
        return raw

    # -- sizes ---------------------------------------------------------------------------------------------
    @property
    def n_compressed(self) -> int:
        return self._n

    def _cpos(self) -> torch.Tensor:
        """Compressed tokens' positions, [1 or kv_heads, N] int32."""
        if self.cpos is not None:
            return self.cpos
        return (self.cpos_start + torch.arange(self._n, device=self.device, dtype=torch.int32))[None]

    @property
    def length(self) -> int:
        return self.n_compressed + self.raw.length

    @property
    def n_committed(self) -> int:  # type: ignore[override]
        return self.n_compressed + self.raw.n_committed

    @n_committed.setter
    def n_committed(self, value: int) -> None:
        self.raw.n_committed = value - self.n_compressed

    @property
    def positions(self) -> torch.Tensor:
        cpos = self._cpos().to(torch.long).expand(self.kv_heads, -1)
        return torch.cat([cpos, self.raw.positions], dim=1)

    # -- raw and coded heads -------------------------------------------------------------------------------
    def coded(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of a [kv_heads, ...] tensor that belong to the coded heads (x itself when all are)."""
        return x if not self.n_full else x[self.coded_heads]

    def merge(self, coded: torch.Tensor | None, full: torch.Tensor | None) -> torch.Tensor:
        """Per-head results of the coded heads and of the raw heads, back in kv-head order (None: no such heads)."""
        if full is None or coded is None:
            return coded if full is None else full.float()
        out = coded.new_empty(self.kv_heads, *coded.shape[1:])
        out[self.coded_heads] = coded
        out[self.full_heads] = full.to(out.dtype)
        return out

    # -- the compressed region -----------------------------------------------------------------------------
    def _group_fields(self) -> Fields:
        """Each compressed token's group fields, [coded heads, N, ...]."""
        n = self.n_compressed
        if self.gidx is None:
            return {name: t.repeat_interleave(self.codec.group, dim=1)[:, :n] for name, t in self.grp.items()}
        out = {}
        for name, t in self.grp.items():
            idx = self.gidx.to(torch.long).expand(self.n_coded, -1)
            out[name] = t.gather(1, idx.view(*idx.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:]))
        return out

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The compressed region dequantized, [kv_heads, N, dim] float32 (transient)."""
        if not self.n_compressed:
            empty = torch.empty(self.kv_heads, 0, self.head_dim, device=self.device)
            return empty, empty
        coded = self.codec.decode(self.tok, self._group_fields()) if self.n_coded else (None, None)
        if not self.n_full:
            return coded
        return self.merge(coded[0], self.full["k"]), self.merge(coded[1], self.full["v"])

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.decoded()
        rk, rv = self.raw.view()
        return torch.cat([k.to(self.dtype), rk], dim=1), torch.cat([v.to(self.dtype), rv], dim=1)

    def _flush(self) -> None:
        """KIVI's rule: once the committed raw tail holds `residual` tokens (and a group), encode all of it
        that fills whole groups. Forms with another rule override this and call `_encode_oldest`."""
        g = self.codec.group
        r = self.raw.n_committed
        if r >= max(self.residual, g):
            self._encode_oldest((r // g) * g)

    def _encode_oldest(self, n: int) -> None:
        """Move the `n` oldest committed raw tokens (whole groups) into the compressed region."""
        g = self.codec.group
        r = self.raw.n_committed
        k, v = self.raw.view()
        pos = self.raw.positions[:, :n]
        tok, grp = {}, {}
        if self.n_coded:
            tok, grp = self.codec.encode(self.coded(k[:, :n]).reshape(self.n_coded, n // g, g, -1),
                                         self.coded(v[:, :n]).reshape(self.n_coded, n // g, g, -1))
        for name, x in (("k", k), ("v", v)):  # raw heads: copied as they are (indexing copies)
            if self.n_full:
                part = x[self.full_heads, :n]
                self.full[name] = torch.cat([self.full[name], part], dim=1) if name in self.full else part
        n_groups = next(iter(self.grp.values())).shape[1] if self.grp else 0
        if self.gidx is None and self.n_compressed % g and grp:
            self.gidx = self._implicit_gidx()
        if self.gidx is not None:
            new = (n_groups + torch.arange(n, device=pos.device) // g).to(self.gidx.dtype)
            if n_groups + n // g >= 1 << 15:
                self.gidx = self.gidx.to(torch.int32)
            self.gidx = torch.cat([self.gidx, new[None].expand(self.gidx.shape[0], -1).to(self.gidx.dtype)], dim=1)
        shared = bool((pos == pos[:1]).all()) and (self.cpos is None or self.cpos.shape[0] == 1)
        pos = pos[:1] if shared else pos
        if self._n == 0 and shared:
            self.cpos_start = int(pos[0, 0])
        start = self.cpos_start + self._n
        consecutive = shared and bool((pos[0] == torch.arange(start, start + n, device=pos.device)).all())
        if not (self.cpos is None and consecutive):
            self.cpos = torch.cat([self._cpos().expand(pos.shape[0], -1), pos.to(torch.int32)], dim=1)
        self._n += n
        rows = self.n_coded if pos.shape[0] > 1 else 1
        if self.gidx is not None and self.gidx.shape[0] != rows:
            self.gidx = self.gidx.expand(rows, -1).contiguous()
        for name, t in tok.items():
            self.tok[name] = torch.cat([self.tok[name], t], dim=1) if name in self.tok else t
        for name, t in grp.items():
            self.grp[name] = torch.cat([self.grp[name], t], dim=1) if name in self.grp else t
        self.raw.keep(torch.arange(n, self.raw.length))
        self.raw.n_committed = r - n

    def _implicit_gidx(self) -> torch.Tensor:
        groups = torch.arange(self.n_compressed, device=self.device) // self.codec.group
        return groups.to(torch.int16 if self.n_compressed // self.codec.group < 1 << 15 else torch.int32)[None]

    def _gather_compressed(self, index: torch.Tensor) -> None:
        """Keep compressed tokens `index` ([1 or kv_heads, m]) of each head; never re-encodes."""
        if self.gidx is None and self.grp:  # codecs without group fields need no index
            self.gidx = self._implicit_gidx()
        rows = index.shape[0]
        every = index.expand(self.kv_heads, -1)
        for fields, idx in ((self.tok, self.coded(every)), (self.full, every[self.full_heads])):
            for name, t in fields.items():
                fields[name] = t.gather(1, idx.view(*idx.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:]))
        if self.gidx is not None:
            coded = self.coded(every)
            self.gidx = self.gidx.expand(self.n_coded, -1).gather(1, coded) if rows > 1 else self.gidx[:, index[0]]
        cpos = self._cpos()
        self.cpos = cpos.expand(rows, -1).gather(1, index) if rows > 1 else cpos[:, index[0]]
        self._n = index.shape[1]

    # -- the LayerCache contract ---------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        self.raw.append(k, v, positions)

    def commit(self, offsets: list[int] | None = None) -> None:
        if self.observer is not None:
            n_new = self.length - self.n_committed
            self.observer.commit(list(range(n_new)) if offsets is None else offsets)
        self.raw.commit(offsets)
        self._flush()

    def rollback(self) -> None:
        if self.observer is not None:
            self.observer.commit([])
        self.raw.rollback()

    def truncate(self, length: int) -> None:
        n = self.n_compressed
        if length >= n:
            self.raw.truncate(length - n)
            return
        self.raw.truncate(0)
        self.raw.n_committed = 0
        implicit_pos, implicit_groups = self.cpos is None, self.gidx is None
        self._gather_compressed(torch.arange(length, device=self.device)[None])
        if implicit_pos:  # a prefix of consecutive positions still is
            self.cpos = None
        if implicit_groups:  # and slot // group still finds each token's group
            self.gidx = None

    def keep(self, slots: torch.Tensor) -> None:
        n_c = self.n_compressed
        slots = slots.to(self.device)
        if slots.dim() == 1:
            comp, raw = slots[slots < n_c], slots[slots >= n_c] - n_c
            if comp.numel() != n_c or (n_c and not bool((comp == torch.arange(n_c, device=comp.device)).all())):
                self._gather_compressed(comp[None])
            self.raw.keep(raw.cpu())
            self._flush()
            return
        # Per head: each head keeps the same number of tokens, but not necessarily of compressed ones.
        m = int((slots < n_c).sum(1).min())
        rest = slots[:, m:]
        if not (rest >= n_c).all():  # some heads keep more compressed tokens: decode those into the raw tail
            k_all, v_all = self.view()
            pos_all = self.positions
            idx = rest[:, :, None].expand(-1, -1, self.head_dim)
            k, v, pos = k_all.gather(1, idx), v_all.gather(1, idx), pos_all.gather(1, rest)
            self._gather_compressed(slots[:, :m])
            self.raw = self._new_raw(max(rest.shape[1], self.raw_floor))
            self.raw.append(k, v, pos)
        else:
            self._gather_compressed(slots[:, :m])
            self.raw.keep(rest - n_c)
        self.raw.n_committed = self.raw.length
        self._flush()

    def nbytes_per_head(self) -> torch.Tensor:
        c = self.n_coded
        coded = sum(_nbytes_per_head(t, c) for t in (*self.tok.values(), *self.grp.values()))
        coded += _nbytes_per_head(self.gidx, c) + (self.codec.extra_nbytes_per_head() if c else 0)
        out = self.raw.nbytes_per_head() + _nbytes_per_head(self.cpos, self.kv_heads)  # positions: every head's
        if not self.n_full:
            return out + coded
        out[self._coded_list] += coded
        out[self._full_list] += sum(_nbytes_per_head(t, self.n_full) for t in self.full.values())
        return out

    def head_stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        h, n = self.kv_heads, self.length
        total = self.nbytes_per_head()
        index = torch.full((h,), _nbytes_per_head(self.cpos, h) + self.raw.length * 8, dtype=torch.long)
        index[self._coded_list] += _nbytes_per_head(self.gidx, self.n_coded)
        held = torch.full((h,), (self.n_compressed * self.codec.held_fraction() + self.raw.length) / max(n, 1))
        held[self._full_list] = n / max(n, 1)  # raw heads hold every element of their tokens
        return torch.full((h,), n, dtype=torch.long), total, total - index, held


def parse_layers(text: str) -> set[int]:
    """'0/1/5-7' (or with ',' or spaces between) -> {0, 1, 5, 6, 7}; '' -> empty."""
    from workbench.errors import SpecError

    out: set[int] = set()
    for part in filter(None, re.split(r"[,/\s]+", text.strip())):
        try:
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise SpecError(f"skip_layers: {part!r} is not a layer index or range; write e.g. '0/1/10-12'") from None
    return out


def channels_per_block(policy: str, param_name: str, value: int, head_dim: int) -> int:
    """`value` channels per block, or the whole head when the head is narrower; a block size that does not
    divide head_dim is refused with a SpecError naming the policy's parameter."""
    from workbench.errors import SpecError

    block = min(value, head_dim)
    if head_dim % block:
        raise SpecError(f"{policy}: {param_name}={value} must divide the model's head_dim {head_dim}")
    return block


SKIP_LAYERS_HELP = "layers left in the previous policy's form (dense if none), e.g. '0/1' or '0-2'"
RAW_HEADS_HELP = ("kv heads kept raw (model dtype, uncompressed) in the compressed layers: '0' = head 0 of every "
                  "layer, '1@3/0-2@5' = head 1 of layer 3 and heads 0-2 of layer 5")
_RAW_HEADS_SYNTAX = ("write heads or heads@layers joined by '/', each an index or a range: '0' (head 0 of every "
                     "compressed layer), '0-1@3' (heads 0 and 1 of layer 3), '2/1@3/0-2@5'")


def _index_range(text: str) -> range:
    lo, _, hi = text.partition("-")
    out = range(int(lo), int(hi or lo) + 1)  # int() refuses '' and signs: ValueError
    if not out:
        raise ValueError(text)
    return out


def parse_heads(text: str) -> dict[int | None, set[int]]:
    """raw_heads: '0/1@3/0-2@5' -> {None: {0}, 3: {1}, 5: {0, 1, 2}} (None: every compressed layer)."""
    from workbench.errors import SpecError

    out: dict[int | None, set[int]] = {}
    for part in filter(None, re.split(r"[,/\s]+", text.strip())):
        heads, at, layers = part.partition("@")
        try:
            for layer in _index_range(layers) if at else [None]:
                out.setdefault(layer, set()).update(_index_range(heads))
        except ValueError:
            raise SpecError(f"raw_heads: {part!r} is not a head or heads@layers; {_RAW_HEADS_SYNTAX}") from None
    return out


class CompressedPolicy(CachePolicy):
    """Base of the compressed-form policies: layers listed in `skip_layers` keep the previous policy's form
    (dense by default); every other layer gets a `layer_cache_class` (CompressedLayerCache) with this policy's
    codec, whose kv heads listed in `raw_heads` stay raw (see the module docstring). Subclasses declare
    `residual`, `skip_layers` and `raw_heads` params and implement `codec(layer, config, dtype)`."""

    residual: int
    skip_layers: str
    raw_heads: str
    layer_cache_class = CompressedLayerCache

    def check(self) -> None:
        from workbench.errors import SpecError

        skipped = parse_layers(self.skip_layers)
        clash = sorted(skipped & {layer for layer in parse_heads(self.raw_heads) if layer is not None})
        if clash:
            raise SpecError(f"raw_heads names layer {clash[0]}, which skip_layers leaves in the previous form; "
                            "name heads of compressed layers only")

    def raw_heads_of(self, layer: int, config: ModelConfig) -> set[int]:
        """The kv heads of `layer` kept raw; refuses heads and layers the model does not have."""
        from workbench.errors import SpecError

        chosen = parse_heads(self.raw_heads)
        n_layers, n_heads = config.num_layers, config.num_kv_heads
        for where, heads in chosen.items():
            if where is not None and where >= n_layers:
                raise SpecError(f"raw_heads: layer {where} does not exist; the model has {n_layers} layers "
                                f"(0-{n_layers - 1})")
            if max(heads) >= n_heads:
                raise SpecError(f"raw_heads: kv head {max(heads)} does not exist; the model has {n_heads} kv heads "
                                f"per layer (0-{n_heads - 1})")
        return chosen.get(None, set()) | chosen.get(layer, set())

    def codec(self, layer: int, config: ModelConfig, dtype: torch.dtype) -> Codec:
        raise NotImplementedError

    def make_layer_cache(self, layer: int, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                         capacity: int) -> LayerCache | None:
        if layer in parse_layers(self.skip_layers):
            return None
        raw_heads = self.raw_heads_of(layer, config)
        codec = self.codec(layer, config, dtype)
        return self.layer_cache_class(codec, config.num_kv_heads, config.head_dim, dtype, device, capacity,
                                      self.residual, raw_heads)
