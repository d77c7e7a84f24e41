"""CacheGen: the KV cache as a range-coded bitstream, written after a prefill and loaded instead of one."""

from dataclasses import dataclass

import constriction
import pytest
import torch

from workbench.cache.base import CachePolicy, KVCache
from workbench.cache.cachegen import decode_cache, decode_tensor, encode_tensor
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.models.random import random_model
from workbench.spec import RunSpec, TechniqueSpec

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [int(t) for t in torch.randint(3, 500, (120,), generator=torch.Generator().manual_seed(2))]


@pytest.fixture(scope="module")
def model():
    return random_model("llama", seed=4, num_hidden_layers=3, max_position_embeddings=1024)


@dataclass
class Grab(CachePolicy):
    cache: KVCache | None = None

    def on_cache_built(self, cache: KVCache) -> None:
        self.cache = cache


def run(model, prompt, new=4, **params):
    engine = Engine(model, RunSpec(max_new_tokens=new, cache=[TechniqueSpec("cachegen", params)]))
    grab = Grab()
    engine.policies.append(grab)
    events = list(engine.run(prompt))
    return events, grab.cache, engine.policies[0]


def roundtrip(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    encoder = constriction.stream.queue.RangeEncoder()
    side = encode_tensor(x, 10, bits, encoder)
    stream = encoder.get_compressed()
    decoder = constriction.stream.queue.RangeDecoder(stream)
    return decode_tensor(decoder, side, *x.shape, 10), stream.nbytes


def test_more_bits_give_a_closer_tensor_and_a_longer_stream():
    x = torch.randn(2, 300, 16) * torch.linspace(0.1, 4, 16) + torch.randn(2, 1, 16)
    errors, sizes = zip(*((float((y - x).norm() / x.norm()), n) for y, n in (roundtrip(x, b) for b in (2, 4, 6))))
    assert errors[0] > 3 * errors[1] > 9 * errors[2] and errors[2] < 0.03
    assert sizes[0] < sizes[1] < sizes[2] < x.numel() * 2  # below float16 at every setting here


def test_the_sink_tokens_are_kept_in_float16_and_the_rest_coded():
    x = torch.randn(2, 60, 16) * 3
    encoder = constriction.stream.queue.RangeEncoder()
    side = encode_tensor(x, 10, 3, encoder, sinks=4)
    y = decode_tensor(constriction.stream.queue.RangeDecoder(encoder.get_compressed()), side, *x.shape, 10)
    assert torch.equal(y[:, :4], x[:, :4].half().float())
    assert len(side) == len(encode_tensor(x, 10, 3, constriction.stream.queue.RangeEncoder())) + 2 * 2 * 4 * 16
    coded = roundtrip(x[:, 4:], 3)[0]  # the others exactly as if the sinks were not there
    assert torch.equal(y[:, 4:], coded) and not torch.equal(y[:, 4:], x[:, 4:])
    for n in (1, 3):  # a prompt no longer than the sinks keeps one token coded
        encoder = constriction.stream.queue.RangeEncoder()
        side = encode_tensor(x[:, :n], 10, 3, encoder, sinks=4)
        y = decode_tensor(constriction.stream.queue.RangeDecoder(encoder.get_compressed()), side, 2, n, 16, 10)
        assert y.shape == (2, n, 16) and torch.equal(y[:, : n - 1], x[:, : n - 1].half().float())


def test_a_saved_cache_loads_instead_of_the_prefill(model, tmp_path):
    path = tmp_path / "prompt.kvc"
    _, saved_cache, saver = run(model, PROMPT, new=1, save=str(path))
    assert path.stat().st_size == saver.file_bytes < saver.raw_fp16_bytes
    longer = PROMPT + [7, 8, 9]
    events, cache, _ = run(model, longer, load=str(path))
    assert events[0].loaded_tokens == len(PROMPT) and events[0].load_ns > 0
    header, layers = decode_cache(path.read_bytes(), model.config.num_kv_heads, model.config.head_dim)
    assert header["tokens"] == PROMPT
    for layer, (k, v) in zip(cache.layers, layers):  # the loaded tokens are the file's, the rest prefilled
        assert torch.equal(layer.k[:, : len(PROMPT)], k) and torch.equal(layer.v[:, : len(PROMPT)], v)
        assert layer.positions[0, : len(longer)].tolist() == list(range(len(longer)))
    exact = saved_cache.layers[0].k[:, : len(PROMPT)]
    assert 0 < float((layers[0][0] - exact).norm() / exact.norm()) < 0.1  # a close copy, not the same cache


def test_the_whole_prompt_in_the_file_still_prefills_its_last_token(model, tmp_path):
    path = tmp_path / "prompt.kvc"
    run(model, PROMPT, new=1, save=str(path))
    events, _, _ = run(model, PROMPT, load=str(path))
    assert events[0].loaded_tokens == len(PROMPT) - 1 and len(events) == 4


def test_round_trip_mode_holds_the_decoded_cache(model, tmp_path):
    path = tmp_path / "prompt.kvc"
    _, exact, _ = run(model, PROMPT, new=1, save=str(path))
    _, cache, policy = run(model, PROMPT, new=1)
    assert 0 < policy.file_bytes < policy.raw_fp16_bytes
    _, layers = decode_cache(path.read_bytes(), model.config.num_kv_heads, model.config.head_dim)
    n = len(PROMPT)
    assert torch.equal(cache.layers[1].v[:, :n], layers[1][1])
    assert not torch.equal(cache.layers[1].v[:, :n], exact.layers[1].v[:, :n])


def test_key_bits_and_the_shallow_layers_bonus_set_each_tensors_resolution(model, tmp_path):
    """key_bits refines the keys alone; shallow refines the first third of the layers alone."""
    heads, dim = model.config.num_kv_heads, model.config.head_dim
    _, exact, _ = run(model, PROMPT, new=1, save=str(tmp_path / "exact.kvc"))  # saving leaves the cache exact

    def coded(**params):
        path = tmp_path / "p.kvc"
        run(model, PROMPT, new=1, save=str(path), **params)
        header, layers = decode_cache(path.read_bytes(), heads, dim)
        return header["bits"], layers

    def error(layers, layer, which):
        truth = (exact.layers[layer].k if which == 0 else exact.layers[layer].v)[:, : len(PROMPT)]
        return float((layers[layer][which] - truth).norm() / truth.norm())

    bits, plain = coded(bits=3, key_bits=3, shallow=0)
    assert bits == [[3, 3]] * 3
    bits, finer_keys = coded(bits=3, key_bits=6, shallow=0)
    assert bits == [[6, 3]] * 3
    assert all(error(finer_keys, i, 0) < error(plain, i, 0) / 2 for i in range(3))
    assert all(torch.equal(finer_keys[i][1], plain[i][1]) for i in range(3))  # values untouched
    bits, shallow = coded(bits=3, key_bits=3, shallow=2)
    assert bits == [[5, 5], [3, 3], [3, 3]]  # the first third of 3 layers: layer 0
    assert torch.equal(shallow[2][0], plain[2][0]) and error(shallow, 0, 0) < error(plain, 0, 0) / 2


def test_bad_files_and_mismatched_prompts_are_refused(model, tmp_path):
    path = tmp_path / "prompt.kvc"
    run(model, PROMPT, new=1, save=str(path))
    with pytest.raises(SpecError, match="do not begin this prompt"):
        run(model, [9] + PROMPT, load=str(path))
    other = random_model("llama", seed=5, num_hidden_layers=3, max_position_embeddings=1024)
    with pytest.raises(SpecError, match="encoded from another model"):
        run(other, PROMPT, load=str(path))
    junk = tmp_path / "junk.kvc"
    junk.write_bytes(b"not a cache")
    with pytest.raises(SpecError, match="not a CacheGen KV file"):
        run(model, PROMPT, load=str(junk))
    with pytest.raises(SpecError, match="is not a file"):
        run(model, PROMPT, load=str(tmp_path / "missing.kvc"))
