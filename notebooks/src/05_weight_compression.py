# Lab 5 source (scripts/make_notebooks.py writes the notebooks from it).
# ruff: noqa: E402
# %% [markdown]
# # Lab 5: weight compression
#
# Lab 1 showed that a decoding step on a CPU is **memory-bound**: it reads every weight once per token. Fewer
# bytes per weight means fewer bytes to read, so compression can make decoding *faster*, not only smaller,
# as long as a kernel computes on the compressed form directly. This lab compares:
#
# * **int8**: one scale per output channel, symmetric (LLM.int8()'s vector-wise quantization, arXiv 2208.07339,
#   without its outlier decomposition);
# * **int4**: groups of 32 inputs share a scale and an offset, round to nearest (the format of GPTQ's and
#   AWQ's kernels);
# * **GPTQ** (arXiv 2210.17323): the same int4 format, but each column's rounding error is compensated on the
#   columns not yet quantized, using second-order statistics from calibration text;
# * **DFloat11** (arXiv 2504.11651): **lossless**: bfloat16's exponent bits carry ~2.6 bits of information,
#   so Huffman-coding them stores the same weights in ~70% of the bytes (decoding them costs time).
#
# Bytes are measured from the model's tensors, perplexity with the `workbench eval` protocol, speed in the
# same session against bfloat16.
# %%
import matplotlib.pyplot as plt
import torch

from workbench import Workbench
from workbench.compression.dfloat11 import DFloat11Linear
from workbench.compression.gptq import gptq_quantize
from workbench.compression.int4 import affine_params
from workbench.eval.quality import compare, evaluation_windows, teacher_forced
from workbench.labs import check_int4

wb = Workbench()
# %% [markdown]
# ## Exercise 1: int4, round to nearest
#
# Write `quantize_int4(w, group)` for a weight matrix `w` `[out, in]`: split each row into groups of `group`
# inputs; per group, `offset` = the minimum, `scale` = (max - min) / 15, `codes` = round((w - offset) /
# scale) clamped to 0..15. Return `(codes [out, in], scale [out, in / group], offset [out, in / group])`.
# %%
def quantize_int4(w, group):
    # BEGIN SOLUTION
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group, group)
    offset = g.amin(-1)
    scale = (g.amax(-1) - offset).clamp_min(1e-8) / 15
    codes = ((g - offset[..., None]) / scale[..., None]).round().clamp(0, 15)
    return codes.to(torch.uint8).reshape(out_f, in_f), scale, offset
    # END SOLUTION


check_int4(quantize_int4)
# %% [markdown]
# ## Bytes, perplexity, speed
#
# Each compression chain loads its own copy of the model (`Workbench` caches them per chain). Perplexity: one
# window of 112 tokens, 16 scored, against bf16; speed: 8 greedy tokens, decoding only (`decode_tok_per_s`,
# the prefill excluded).
# %%
CHAINS = ["", "int8", "int4:group=32,head=true"]
reference, rows = None, []
for chain in CHAINS:
    spec = wb.spec(f"compress={chain}" if chain else None)
    loaded = wb.model(spec)
    forced = [teacher_forced(loaded.model, [], ids, 96, loaded.tokenizer) for ids in evaluation_windows(loaded, 112, 1)]
    reference = reference or forced
    quality = compare(reference, forced)
    speed = wb.generate("Explain photosynthesis.", spec, max_new_tokens=8).summary()["decode_tok_per_s"]
    rows.append({"chain": chain or "bf16", "bytes": loaded.weight_bytes(), "ppl": quality["perplexity"],
                 "kl": quality["kl"], "tok_s": speed})
base = rows[0]
for r in rows:
    print(f"{r['chain']:>14}: {r['bytes'] / 2**20:6.1f} MiB ({r['bytes'] / base['bytes']:.2f}x)  perplexity "
          f"{r['ppl']:6.2f}  KL {r['kl']:.4f}  {r['tok_s']:5.1f} tok/s ({r['tok_s'] / base['tok_s']:.2f}x bf16)")
# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for r in rows:
    axes[0].scatter(r["bytes"] / 2**20, r["ppl"])
    axes[0].annotate(r["chain"].split(":")[0], (r["bytes"] / 2**20, r["ppl"]), fontsize=8)
    axes[1].scatter(r["bytes"] / 2**20, r["tok_s"])
    axes[1].annotate(r["chain"].split(":")[0], (r["bytes"] / 2**20, r["tok_s"]), fontsize=8)
axes[0].set(xlabel="weight MiB", ylabel="perplexity (16 tokens)")
axes[1].set(xlabel="weight MiB", ylabel="decode tok/s")
plt.tight_layout()
plt.show()
# %% [markdown]
# ## GPTQ on one layer
#
# GPTQ's whole-model calibration takes minutes on a CPU (`workbench eval --compress gptq` measures it), so
# here it runs on one matrix: layer 10's query/key/value projection, with its real inputs. What matters is
# the layer's **output** error `|X W^T - X W_hat^T|`, and GPTQ minimises exactly that, using `H = X^T X`.
# %%
model = wb.model(wb.spec()).model
ids = torch.tensor(evaluation_windows(wb.model(wb.spec()), 256, 1)[0])
layer = model.layers[10]
with torch.inference_mode():
    residual = model(ids, torch.arange(len(ids)), hidden_states=True).hidden_states[10].float()
    x = residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + layer.eps) * layer.attn_norm.float()
    w = layer.qkv.weight.float()
hessian = x.T @ x / len(x)


def output_error(codes, scale, offset, group=32):
    w_hat = (codes.float().reshape(w.shape[0], -1, group) * scale[..., None] + offset[..., None]).reshape(w.shape)
    return float((x @ (w - w_hat).T).pow(2).mean().sqrt())


rtn4 = output_error(*quantize_int4(w, 32))
gptq4 = output_error(*gptq_quantize(w, hessian, bits=4, group=32, act_order=True))
groups = w.reshape(w.shape[0], -1, 32)
scale3, offset3 = affine_params(groups, maxq=7)  # round to nearest at 3 bits: codes 0..7
codes3 = ((groups - offset3[..., None]) / scale3[..., None]).round().clamp(0, 7).reshape(w.shape)
rtn3 = output_error(codes3, scale3, offset3)
gptq3 = output_error(*gptq_quantize(w, hessian, bits=3, group=32, act_order=True))
print(f"layer 10 qkv output RMS error (the output's RMS is {float((x @ w.T).pow(2).mean().sqrt()):.2f}):")
print(f"  4 bits: round-to-nearest {rtn4:.4f}, GPTQ {gptq4:.4f}")
print(f"  3 bits: round-to-nearest {rtn3:.4f}, GPTQ {gptq3:.4f} ({rtn3 / gptq3:.1f}x less error)")
# %% [markdown]
# At 4 bits with groups of 32 both errors are tiny on this layer: the embedded model ships as a quantized GGUF
# file, so its weights already sit close to a coarse grid, and round-to-nearest finds it. At 3 bits the grid
# is too coarse and GPTQ's error compensation pays off.
# %% [markdown]
# ## DFloat11 on one layer
#
# Lossless: the bf16 exponent byte is Huffman-coded, the sign and mantissa kept. The entropy of the exponents
# says how small they can get:
# %%
bits = layer.qkv.weight.detach().to(torch.bfloat16).view(torch.int16).int() & 0xFFFF
exponent = (bits >> 7) & 0xFF
p = torch.bincount(exponent.flatten(), minlength=256).double()
p = p[p > 0] / p.sum()
entropy = float(-(p * p.log2()).sum())
df11 = DFloat11Linear(layer.qkv.weight.detach().to(torch.bfloat16), None)
packed = sum(b.numel() * b.element_size() for b in df11.buffers())
exact = torch.equal(df11.dequantized_weight().to(torch.bfloat16), layer.qkv.weight.detach().to(torch.bfloat16))
print(f"exponent entropy {entropy:.2f} bits of 8: {packed / (2 * w.numel()):.2f}x bf16's bytes; "
      f"bit-for-bit the same weights: {exact}")
# %% [markdown]
# ## Why int4 is faster here
#
# The int4 kernel (`kernels/cpu_gemm.c`) reads 4 bits per weight plus a scale and offset per 32 weights (~4.5
# bits) instead of 16, and unpacks them in registers: ~3.5x fewer bytes cross the memory bus per token. A step's
# time is mostly that read, so it speeds up by a large part of that ratio. int8 reads 8 bits. DFloat11 saves
# bytes without loss, but every weight's exponent must be Huffman-decoded before use, which costs far more than
# the bytes it saves on a CPU (the paper targets GPUs, decoding in parallel into on-chip memory;
# `compress=dfloat11` here runs well under 1 tok/s). GPTQ has int4's bytes and speed, with less error. int8's
# speed depends on its int8 matmul kernel (docs/compression.md has the measured figures). Speed ratios from 8
# tokens are noisy on a busy machine; `workbench bench --compress int4:group=32` measures them properly.
#
# **Questions.** (1) The embedding and LM head are one tied 49152 x 576 matrix, a fifth of this model's weights:
# what happens to bytes and speed when it stays in bf16 (`int4:group=32`, whose `head` is false)? (2) Why is
# DFloat11 exactly lossless while int8 is not?
