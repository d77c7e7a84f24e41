"""Our runtime against transformers: float32 logits and greedy decoding, on every tiny variant and on the
embedded SmolLM2-135M (integration).

Ours decodes one token at a time through a dense KV cache; transformers runs its own `generate`. Greedy
output identical for 64 tokens means the cache, positions and RoPE agree as well as the first forward.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

import workbench.models.embedded as embedded
from workbench.cache.base import KVCache
from workbench.cache.dense import DensePolicy
from workbench.models import LoadedModel, load_model
from workbench.models.hf import read_hf
from workbench.models.llama import LlamaModel
from workbench.models.random import TINY_VARIANTS
from workbench.models.tokenizer import load_tokenizer
from workbench.models.weights import model_from_hf_state_dict

NEW_TOKENS = 64


@torch.inference_mode()
def greedy_ours(model: LlamaModel, prompt: torch.Tensor, n: int = NEW_TOKENS) -> list[int]:
    """Prefill, then one token per forward, each appended to a dense KV cache and committed."""
    config = model.config
    policy = DensePolicy()
    cache = KVCache([policy.make_layer_cache(i, config, model.dtype, model.device, len(prompt) + n)
                     for i in range(config.num_layers)])
    tokens, positions, out = prompt, torch.arange(len(prompt)), []
    for _ in range(n):
        logits = model(tokens, positions, cache, last_only=True).logits
        cache.commit()
        out.append(int(logits[-1].argmax()))
        tokens, positions = torch.tensor([out[-1]]), positions[-1:] + 1
    return out


@torch.inference_mode()
def greedy_transformers(model: PreTrainedModel, prompt: torch.Tensor, n: int = NEW_TOKENS) -> list[int]:
    """transformers' greedy generate, never stopping at an end-of-sequence token (ours does not either)."""
    out = model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None], do_sample=False,
                         max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def logits_both(ours: LlamaModel, theirs: PreTrainedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ours(ids, torch.arange(len(ids))).logits, theirs(ids[None]).logits[0].float()


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_tiny_variant_matches_transformers(variant, tmp_path, tiny_transformers_model, one_thread):
    theirs = tiny_transformers_model(variant)
    theirs.save_pretrained(tmp_path)
    config, state, _ = read_hf(tmp_path)
    ours = model_from_hf_state_dict(config, state, torch.float32, "cpu")
    prompt = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    a, b = logits_both(ours, theirs, prompt)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    tokens = greedy_ours(ours, prompt)
    assert len(tokens) == NEW_TOKENS and len(set(tokens)) >= 8  # not one token repeated
    assert tokens == greedy_transformers(theirs, prompt)


# The embedded model (integration): ours from the workbench's cache, transformers' own GGUF reading.

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]


@pytest.fixture(scope="module")
def embedded_ours(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """Loaded twice into a fresh cache: the first load converts the GGUF, the one returned reads the cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.mktemp("workbench-cache")))
        converted = load_model("smollm2-135m", dtype="float32", device="cpu")

        def no_dequantizing(*args: object) -> None:
            raise AssertionError("the second load dequantized the GGUF again instead of reading the cache")

        patch.setattr(embedded, "read_gguf", no_dequantizing)
        cached = load_model("smollm2-135m", dtype="float32", device="cpu")
    first, second = converted.model.state_dict(), cached.model.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    return cached


@pytest.fixture(scope="module")
def embedded_transformers() -> PreTrainedModel:
    """transformers' own reading of the GGUF: its config mapping, dequantization and reverse q/k permutation.

    `from_pretrained(..., gguf_file=...)` does the same but requires accelerate, which we do not install.
    """
    path = embedded.embedded_gguf_path()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name),
                                             dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    return model.eval()


def chat_prompt(loaded: LoadedModel) -> torch.Tensor:
    messages = [{"role": "user", "content": "Give me three tips for sleeping better."}]
    return loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"][0]


def encode(loaded: LoadedModel, text: str) -> torch.Tensor:
    return loaded.tokenizer(text, return_tensors="pt").input_ids[0]


@pytest.mark.integration
def test_embedded_weights_equal_transformers_gguf_reading(embedded_ours, embedded_transformers):
    """Bit-exact: the same dequantized values, and llama.cpp's q/k permutation undone the same way."""
    c = embedded_ours.config
    theirs = embedded_transformers.model.layers
    for i in (0, c.num_layers - 1):
        layer = embedded_ours.model.layers[i]
        q, k, v = layer.qkv.weight.split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                                          c.num_kv_heads * c.head_dim])
        attn = theirs[i].self_attn
        assert torch.equal(q, attn.q_proj.weight) and torch.equal(k, attn.k_proj.weight)
        assert torch.equal(v, attn.v_proj.weight) and torch.equal(layer.o.weight, attn.o_proj.weight)
        gate, up = layer.gate_up.weight.chunk(2)
        assert torch.equal(gate, theirs[i].mlp.gate_proj.weight) and torch.equal(up, theirs[i].mlp.up_proj.weight)
    assert torch.equal(embedded_ours.model.embed.weight, embedded_transformers.model.embed_tokens.weight)


@pytest.mark.integration
def test_embedded_cached_tokenizer_equals_the_gguf_one(embedded_ours):
    from_gguf = load_tokenizer(embedded.embedded_gguf_path())
    for text in [*PROMPTS, "naïve café ☕ <|im_start|> 12345"]:
        assert embedded_ours.tokenizer(text).input_ids == from_gguf(text).input_ids
    messages = [{"role": "user", "content": "hi"}]
    assert (embedded_ours.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == from_gguf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


@pytest.mark.integration
def test_embedded_logits_match_transformers(embedded_ours, embedded_transformers):
    for prompt in [encode(embedded_ours, p) for p in PROMPTS] + [chat_prompt(embedded_ours)]:
        ours, theirs = logits_both(embedded_ours.model, embedded_transformers, prompt)
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)  # measured: at most 5.4e-5


@pytest.mark.integration
def test_embedded_greedy_matches_transformers(embedded_ours, embedded_transformers):
    prompts = [encode(embedded_ours, p) for p in PROMPTS[::2]] + [chat_prompt(embedded_ours)]
    for prompt in prompts:
        assert greedy_ours(embedded_ours.model, prompt) == greedy_transformers(embedded_transformers, prompt)
