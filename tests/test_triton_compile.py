"""Every Triton kernel compiles for a GPU (NVIDIA sm_90, Hopper) on this CPU machine: Triton compiles ahead of
time without a device down to a cubin, so what the interpreter cannot catch (types, layouts, the compiled
dialect of the language) fails here rather than on a lent GPU. Runs where Triton is installed; GPUs run the
kernels themselves (tests/test_triton_cuda.py)."""

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from workbench.kernels import (  # noqa: E402
    triton_attention,
    triton_dfloat11,
    triton_kivi,
    triton_linear,
    triton_mustafar,
    triton_norm,
)

P16, P32, P8, U8, I32, F32 = "*bf16", "*fp32", "*i8", "*u8", "i32", "fp32"
CHUNK = dict(q_ptr=P16, k_ptr=P16, v_ptr=P16, mask_ptr=P8, m_ptr=P32, l_ptr=P32, acc_ptr=P32, part_base=I32,
             parts=I32, n_new=I32, n_past=I32, s_total=I32, chunk=I32, rows=I32, dim=I32, scale=F32,
             q_stride_t=I32, q_stride_h=I32, k_stride_h=I32, k_stride_s=I32, v_stride_h=I32, v_stride_s=I32)
ATTENTION = dict(GROUP=4, BLOCK_D=128, BLOCK_S=32)
KERNELS = {
    "rms_norm": (triton_norm._rms_norm_kernel, dict(
        x_ptr=P16, delta_ptr=P16, w_ptr=P16, sum_ptr=P16, out_ptr=P16, d=I32, x_stride=I32, delta_stride=I32,
        eps=F32), dict(ADD=True, BLOCK=4096)),
    "rope": (triton_norm._rope_kernel, dict(
        x_ptr=P16, cos_ptr=P16, sin_ptr=P16, out_ptr=P16, heads=I32, dim=I32, x_stride_t=I32, x_stride_h=I32,
        table_stride=I32), dict(BLOCK=128)),
    "rope_append": (triton_norm._rope_append_kernel, dict(
        qkv_ptr=P16, cos_ptr=P16, sin_ptr=P16, q_ptr=P16, k_ptr=P16, v_ptr=P16, heads=I32, kv_heads=I32, dim=I32,
        start=I32, qkv_stride_t=I32, qkv_stride_h=I32, table_stride=I32, k_stride_h=I32, k_stride_s=I32,
        v_stride_h=I32, v_stride_s=I32), dict(BLOCK=128)),
    "dfloat11_lut": (triton_dfloat11._lut_kernel, dict(first_ptr="*i32", entry_ptr="*i16", lut_ptr="*i16",
                                                       n_codes=I32), dict(BLOCK=1024)),
    "dfloat11_decode": (triton_dfloat11._decode_kernel, dict(
        words_ptr="*i32", offsets_ptr="*i32", lut_ptr="*i16", sm_ptr=U8, out_ptr="*i16", n_blocks=I32, block=I32,
        n_words=I32), dict(CODE_BITS=12, LANES=64, TILE=16)),
    "swiglu": (triton_norm._swiglu_kernel, dict(gu_ptr=P16, out_ptr=P16, inner=I32, stride=I32), dict(BLOCK=1024)),
    "int8": (triton_linear._int8_kernel, dict(
        x_ptr=P16, codes_ptr=P8, scales_ptr=P16, bias_ptr=P16, out_ptr=P32, n=I32, k=I32, k_chunk=I32, x_stride=I32,
        n_rows=I32),
        dict(HAS_BIAS=True, BLOCK_N=64, BLOCK_K=128)),
    "int4": (triton_linear._int4_kernel, dict(
        x_ptr=P16, packed_ptr=U8, sz_ptr=P16, bias_ptr=P16, out_ptr=P16, n=I32, k=I32, group=I32, k_chunk=I32,
        x_stride=I32, n_rows=I32), dict(HAS_BIAS=True, SUBS=4)),
    "decode": (triton_attention._chunk_kernel, CHUNK,
               dict(MASK=False, CAUSAL=False, USE_DOT=False, BLOCK_R=4, **ATTENTION)),
    "tree": (triton_attention._chunk_kernel, CHUNK, dict(MASK=True, CAUSAL=False, USE_DOT=True, BLOCK_R=64,
                                                         **ATTENTION)),
    "merge": (triton_attention._merge_kernel, dict(
        m_ptr=P32, l_ptr=P32, acc_ptr=P32, out_ptr=P16, n_new=I32, heads=I32, dim=I32, splits=I32),
        dict(GROUP=4, BLOCK_R=4, BLOCK_D=128, BLOCK_P=16)),
    "kivi": (triton_kivi._kivi_chunk_kernel, dict(
        q_ptr=P16, kc_ptr=U8, vc_ptr=U8, ks_ptr="*fp16", km_ptr="*fp16", vs_ptr="*fp16", vm_ptr="*fp16",
        gidx_ptr="*i16", m_ptr=P32, l_ptr=P32, acc_ptr=P32, parts=I32, n_tok=I32, n_groups=I32, chunk=I32,
        rows=I32, dim=I32, scale=F32, q_stride_h=I32, gidx_stride=I32),
        dict(BITS=2, PER=4, GROUP_TOKENS=64, CHANNELS=64, HAS_GIDX=True, BLOCK_R=4, **ATTENTION)),
    "mustafar": (triton_mustafar._mustafar_chunk_kernel, dict(
        q_ptr=P16, kb_ptr=U8, kv_ptr=P16, vb_ptr=U8, vv_ptr=P16, m_ptr=P32, l_ptr=P32, acc_ptr=P32, parts=I32,
        n_tok=I32, kept=I32, chunk=I32, rows=I32, dim=I32, scale=F32, q_stride_h=I32),
        dict(BLOCK_R=4, **ATTENTION)),
}


@pytest.mark.parametrize("name", KERNELS)
def test_the_kernel_compiles_for_sm90(name):
    kernel, types, constants = KERNELS[name]
    assert set(types) | set(constants) == set(kernel.arg_names), "the signature above is out of date"
    signature = {arg: types.get(arg, "constexpr") for arg in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]
