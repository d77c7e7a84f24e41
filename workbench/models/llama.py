"""A compact Llama-family transformer: Llama 2/3, Mistral, Qwen2/2.5, Qwen3 and SmolLM.

One file, plain modules, batch size one. Projections are fused (q|k|v and gate|up) so a decode step runs
few, large matrix products. Linear layers are ordinary `nn.Linear` modules, so weight transforms swap them
for quantized or encoded modules with the same call interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from workbench.cache.base import KVCache
from workbench.kernels import dispatch
from workbench.models.attention import SMALL_QUERY, attention
from workbench.models.config import ModelConfig


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [T, vocab] float32 (or [1, vocab] with last_only); None with no_logits
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

    def forward(self, x, cos, sin, positions, layer_cache, new_mask, part: str | None = None,
                kernels: dispatch.Kernels | None = None):
        """The layer; `part` "attn" or "mlp" runs that sublayer alone (a layer plan's sublayer entries).
        kernels: the model's operations (`dispatch.kernels`: RMSNorm [arXiv 1910.07467, eq. 4], RoPE [RoFormer,
        arXiv 2104.09864, eq. 34; Hugging Face's half layout], SwiGLU [arXiv 2002.05202, eq. 5], attention),
        resolved from x when not given."""
        ops = kernels or dispatch.kernels(x.device, x.dtype)
        if part == "mlp":
            return x + self.down(ops.swiglu(self.gate_up(ops.rms_norm(x, self.mlp_norm, self.eps))))
        n = x.shape[0]
        h = ops.rms_norm(x, self.attn_norm, self.eps)
        qkv = self.qkv(h).view(n, self.n_heads + 2 * self.n_kv, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=1)
        if self.q_norm is not None:  # Qwen3: RMSNorm over each head's q and k before RoPE
            q = ops.rms_norm(q, self.q_norm, self.eps)
            k = ops.rms_norm(k, self.k_norm, self.eps)
            q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
        elif (buffers := self._writable(layer_cache, positions, qkv.dtype, ops)) is not None:
            q, k, v = ops.rope_append(qkv, cos, sin, *buffers), None, None  # one launch: RoPE and the append
        else:  # q and k are adjacent in the fused output: rotate both in one go
            qk = ops.rope(qkv[:, : self.n_heads + self.n_kv], cos, sin)
            q, k = qk.split([self.n_heads, self.n_kv], dim=1)
        out = attention(q, k, v, positions, layer_cache, new_mask, ops)
        if part == "attn":
            return x + self.o(out)
        x, h = ops.add_rms_norm(x, self.o(out), self.mlp_norm, self.eps)
        return x + self.down(ops.swiglu(self.gate_up(h)))


    @staticmethod
    def _writable(layer_cache, positions, dtype, ops: dispatch.Kernels):
        """A dense cache's buffers and first reserved slot for `rope_append`, where a kernel fuses it (None: RoPE
        and the append run apart; `writable_buffers` reserves the slots only when it answers)."""
        if layer_cache is None or not ops.fuses_rope_append:
            return None
        return layer_cache.writable_buffers(positions, dtype)


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
        # forwards through every layer so far: the engine tells a drafter's own target forwards from this
        self.whole_forwards = 0

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
        embeds: torch.Tensor | None = None,
        no_logits: bool = False,
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
        embeds: [T, hidden] input vectors used instead of the tokens' embeddings (Superposed Decoding feeds a
            weighted sum of several tokens' embeddings); `tokens` then only gives T.
        no_logits: skip the final norm and LM head (logits None), for callers that read `final_hidden` only (a
            drafter with a head of its own on a prefix of the layers: Kangaroo).
        """
        x = self.embed(tokens) if embeds is None else embeds.to(self.dtype)
        freqs = positions.to(torch.float32)[:, None, None] * self.inv_freq  # [T, 1, dim / 2]
        cos = freqs.cos().to(x.dtype).repeat(1, 1, 2)
        sin = freqs.sin().to(x.dtype)
        sin = torch.cat((-sin, sin), dim=-1)
        plan = range(len(self.layers)) if layers is None else layers
        self.whole_forwards += layers is None
        states = [] if hidden_states else None
        ops = dispatch.kernels(x.device, x.dtype)  # this forward's operations, resolved once
        # Consecutive layers that a backend takes whole run in one call (the `decoder_layers` operation): the
        # same kernels in the same order as their separate calls, so the same bits, without Python between layers.
        fusable = cache is not None and states is None and x.shape[0] <= SMALL_QUERY and ops.fuses(x, cos, sin)
        rows: list[list[int]] = []
        keep: list = []  # what the rows point into
        stack = list(self.layers)  # plain indexing: ModuleList's costs microseconds a call, twice a layer a step
        for entry in plan:
            i, part = (entry, None) if isinstance(entry, int) else entry
            # The one-call layers take the config's MLP width: a layer pruned narrower (prunenet) runs on its own.
            # (A wrapped projection without in_features, a fine-tune's for one, is left to layer_row to judge.)
            width = getattr(stack[i].down, "in_features", None) if fusable and part is None else -1
            whole = width in (None, self.config.intermediate_size)
            row = ops.layer_row(stack[i], positions, cache[i], mask, keep) if whole else None
            if row is not None:
                rows.append(row)
                continue
            x = self._run_fused(ops, x, rows, cos, sin)
            if states is not None:
                states.append(x)
            x = stack[i](x, cos, sin, positions, cache[i] if cache is not None else None, mask, part, ops)
        x = self._run_fused(ops, x, rows, cos, sin)
        if states is not None:
            states.append(x)
        final = x if final_hidden else None
        if last_only:
            x = x[-1:]
        return ModelOutput(None if no_logits else self.logits(x), states, final)

    def _run_fused(self, ops: dispatch.Kernels, x: torch.Tensor, rows: list[list[int]], cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.Tensor:
        """The layers collected in `rows` (emptied), in one call; x unchanged when there are none."""
        if not rows:
            return x
        x = ops.decoder_layers(x, rows, self.config, cos, sin)
        rows.clear()
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on residual-stream states [T, hidden] -> float32 logits [T, vocab]."""
        x = dispatch.kernels(x.device, x.dtype).rms_norm(x, self.norm, self.config.rms_norm_eps)
        return self.lm_head(x).float()
