"""A compact Llama-family transformer: Llama 2/3, Mistral, Qwen2/2.5, Qwen3 and SmolLM.

One file, plain modules, batch size one. Projections are fused (q|k|v and gate|up) so a decode step runs
few, large matrix products. Linear layers are ordinary `nn.Linear` modules, so weight transforms swap them
for quantized or encoded modules with the same call interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workbench.cache.base import KVCache
from workbench.kernels import cpu as cpu_kernels
from workbench.models.attention import SMALL_QUERY, attention, visible_keys
from workbench.models.config import ModelConfig


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [T, vocab] float32 (or [1, vocab] with last_only)
    hidden_states: list[torch.Tensor] | None = None  # input to each layer run, then the final output
    final_hidden: torch.Tensor | None = None  # the last layer's output for every token [T, hidden], if asked


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2]; Llama 3.1 rescales them ("llama3" rope_scaling)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if scaling:  # Llama 3.1: slow down low frequencies, keep high ones, interpolate between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(is_mid, mid, scaled)
    return inv_freq.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm [arXiv 1910.07467, eq. 4]: x / sqrt(mean(x^2) + eps) * weight.

    On the CPU in bf16, one call of the workbench's kernel (`workbench.kernels.cpu`). Otherwise through the
    fused LayerNorm kernel: [x, -x] has mean 0 and variance mean(x^2), so LayerNorm of it is RMSNorm of x in
    its first half (4 kernels where `F.rms_norm` takes about 8); the results agree to rounding."""
    if cpu_kernels.rows_fit(x) and weight.dtype == x.dtype:
        return cpu_kernels.rms_norm(x, weight, eps)[1]
    d = x.shape[-1]
    return F.layer_norm(torch.cat((x, -x), dim=-1), (2 * d,), None, None, eps)[..., :d] * weight


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm: (x + delta, rms_norm(x + delta)), in one kernel call where it runs."""
    if cpu_kernels.rows_fit(x) and weight.dtype == delta.dtype == x.dtype:
        return cpu_kernels.rms_norm(x, weight, eps, delta)
    x = x + delta
    return x, rms_norm(x, weight, eps)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU [arXiv 2002.05202, eq. 5] on the fused gate|up product: silu(gate) * up."""
    if cpu_kernels.rows_fit(gate_up):
        return cpu_kernels.swiglu(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + dim/2) [RoFormer, arXiv 2104.09864, eq. 34; Hugging Face's half layout]:
    x * cos + (-x2, x1) * sin, written as x * cos + roll(x, dim/2) * (-sin, sin) to take three kernels.
    x: [T, heads, dim]; cos, signed_sin: [T, 1, dim]. On the CPU in bf16, one call of the workbench's kernel."""
    if cpu_kernels.rope_fits(x, cos, signed_sin):
        return cpu_kernels.rope(x, cos, signed_sin)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.eps = c.rms_norm_eps
        self.attn_norm = nn.Parameter(torch.ones(c.hidden_size))
        self.qkv = nn.Linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, bias=c.attention_bias)
        self.o = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = nn.Parameter(torch.ones(c.head_dim)) if c.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(c.head_dim)) if c.qk_norm else None
        self.mlp_norm = nn.Parameter(torch.ones(c.hidden_size))
        self.gate_up = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)
        self.down = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, positions, layer_cache, new_mask, part: str | None = None):
        """The layer; `part` "attn" or "mlp" runs that sublayer alone (a layer plan's sublayer entries)."""
        if part == "mlp":
            return x + self.down(swiglu(self.gate_up(rms_norm(x, self.mlp_norm, self.eps))))
        n = x.shape[0]
        h = rms_norm(x, self.attn_norm, self.eps)
        qkv = self.qkv(h).view(n, self.n_heads + 2 * self.n_kv, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=1)
        if self.q_norm is not None:  # Qwen3: RMSNorm over each head's q and k before RoPE
            q = rms_norm(q, self.q_norm, self.eps)
            k = rms_norm(k, self.k_norm, self.eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:  # q and k are adjacent in the fused output: rotate both in one go
            qk = apply_rope(qkv[:, : self.n_heads + self.n_kv], cos, sin)
            q, k = qk.split([self.n_heads, self.n_kv], dim=1)
        out = attention(q, k, v, positions, layer_cache, new_mask)
        if part == "attn":
            return x + self.o(out)
        x, h = add_rms_norm(x, self.o(out), self.mlp_norm, self.eps)
        return x + self.down(swiglu(self.gate_up(h)))

    def kernel_args(self, positions, layer_cache, new_mask, keep: list) -> list[int] | None:
        """This layer's row for the CPU kernels' one-call layers (`cpu.decoder_layers`), or None where they do
        not take it: its weights must be in the kernels' layouts (`kernel_weights()`: bf16, int8 or int4) and its
        cache must offer its buffers (only then are slots reserved in it, so None changes nothing). Tensors the
        row points into are appended to `keep`. The caller checks what all layers share (x, the RoPE tables)."""
        if (layer_cache is None or self.q_norm is not None or self.head_dim % 32 or self.head_dim > 256
                or self.down.in_features % 16 or not (self.attn_norm.dtype == self.mlp_norm.dtype == torch.bfloat16)):
            return None
        weights = [getattr(m, "kernel_weights", lambda: None)() for m in (self.qkv, self.o, self.gate_up, self.down)]
        if None in weights:
            return None
        buffers = layer_cache.writable_buffers(positions, torch.bfloat16)  # last: it reserves the slots
        if buffers is None:
            return None
        k, v, past = buffers
        visible = visible_keys(new_mask, positions.shape[-1], past, positions.device)
        visible = None if visible is None else visible.contiguous()
        keep.append(visible)
        return cpu_kernels.layer_args((self.attn_norm, self.mlp_norm), weights, k, v, past, visible)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def _apply(self, fn, recurse=True):
        # RoPE frequencies stay float32 on the weights' device, whatever dtype the weights are cast to.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config).to(self.embed.weight.device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        layers: list[int | tuple[int, str]] | None = None,
        hidden_states: bool = False,
        last_only: bool = False,
        final_hidden: bool = False,
    ) -> ModelOutput:
        """Run the model over new tokens.

        tokens, positions: [T] token ids and their logical positions.
        cache: appended to in every layer run; None attends over the new tokens alone.
        mask: [T, T] bool among the new tokens (True = may attend); None is causal. Every token already
            in the cache is visible to every new token.
        layers: the layer plan, a subset of layer indices to run in order (None = all), for layer skipping; an
            entry (i, "attn") or (i, "mlp") runs only that sublayer of layer i.
        hidden_states: also return the residual stream before each layer run and after the last.
        last_only: compute logits for the last token only (prefill).
        final_hidden: also return the last layer's output for every token (`logits` of any rows of it give
            their logits, a few rows at a time where the whole [T, vocab] would be too large).
        """
        x = self.embed(tokens)
        freqs = positions.to(torch.float32)[:, None, None] * self.inv_freq  # [T, 1, dim / 2]
        cos = freqs.cos().to(x.dtype).repeat(1, 1, 2)
        sin = freqs.sin().to(x.dtype)
        sin = torch.cat((-sin, sin), dim=-1)
        plan = range(len(self.layers)) if layers is None else layers
        states = [] if hidden_states else None
        # Consecutive layers that the CPU kernels take run in one call (`cpu.decoder_layers`): the same kernels
        # in the same order as their separate calls, so the same bits, without Python between layers.
        fusable = (cache is not None and states is None and x.shape[0] <= SMALL_QUERY and cpu_kernels.rows_fit(x)
                   and cos.is_contiguous() and sin.is_contiguous())
        rows: list[list[int]] = []
        keep: list = []  # what the rows point into
        for entry in plan:
            i, part = (entry, None) if isinstance(entry, int) else entry
            row = self.layers[i].kernel_args(positions, cache[i], mask, keep) if fusable and part is None else None
            if row is not None:
                rows.append(row)
                continue
            x = self._run_fused(x, rows, cos, sin)
            if states is not None:
                states.append(x)
            x = self.layers[i](x, cos, sin, positions, cache[i] if cache is not None else None, mask, part)
        x = self._run_fused(x, rows, cos, sin)
        if states is not None:
            states.append(x)
        final = x if final_hidden else None
        if last_only:
            x = x[-1:]
        return ModelOutput(self.logits(x), states, final)

    def _run_fused(self, x: torch.Tensor, rows: list[list[int]], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The layers collected in `rows` (emptied), in one kernel call; x unchanged when there are none."""
        if not rows:
            return x
        c = self.config
        x = cpu_kernels.decoder_layers(x, rows, c.rms_norm_eps, c.num_heads, c.num_kv_heads, c.head_dim,
                                       c.intermediate_size, cos, sin)
        rows.clear()
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on residual-stream states [T, hidden] -> float32 logits [T, vocab]."""
        x = rms_norm(x, self.norm, self.config.rms_norm_eps)
        return self.lm_head(x).float()
