"""PruneNet (structured MLP-channel pruning learned as a policy from the weights) on tiny random models (seconds)."""

import pytest
import torch

from workbench.compression.base import apply_compression, linear_sites, weight_nbytes
from workbench.compression.int4 import Int4Linear
from workbench.compression.prunenet import kept_count, ks_distance, learn_policy, spectrum
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.models import LoadedModel
from workbench.models.random import random_model
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import PROMPTS, varied_model

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = "prunenet:ratio=0.25,multiple=16,episodes=3"


def loaded_tiny(dtype: torch.dtype = torch.float32) -> LoadedModel:
    model = varied_model("llama").to(dtype)
    return LoadedModel(model, None, model.config, "tiny", "tiny", dtype, torch.device("cpu"))


def compress(loaded: LoadedModel, text: str):
    return apply_compression(loaded, [TechniqueSpec.parse(t) for t in text.split("+")])


def mlp(layer, x: torch.Tensor) -> torch.Tensor:
    gate, up = layer.gate_up(x).chunk(2, dim=-1)
    return layer.down(torch.nn.functional.silu(gate) * up)


def test_pruned_layers_are_smaller_and_compute_the_kept_channels_exactly():
    loaded = loaded_tiny()
    original = [(layer.gate_up.weight.clone(), layer.down.weight.clone()) for layer in loaded.model.layers]
    before = loaded.weight_bytes()
    reports = compress(loaded, FAST)
    inter, keep = 128, 96  # the tiny model's MLP width, and 75% of it
    assert [r.stage for r in reports] == ["slice"]
    h = loaded.model.config.hidden_size
    assert before - loaded.weight_bytes() == len(original) * 3 * (inter - keep) * h * 4  # real bytes, float32
    x = torch.randn(5, h)
    for layer, (gate_up, down) in zip(loaded.model.layers, original):
        assert layer.gate_up.weight.shape == (2 * keep, h) and layer.down.weight.shape == (h, keep)
        # Which channels were kept: the pruned gate rows are rows of the original, in order.
        kept = [int((gate_up[:inter] == row).all(-1).nonzero()) for row in layer.gate_up.weight[:keep]]
        assert kept == sorted(kept) and len(set(kept)) == keep
        dropped = torch.ones(inter, dtype=torch.bool)
        dropped[kept] = False
        masked = down.clone()
        masked[:, dropped] = 0  # the full layer with the dropped channels' outputs zeroed
        full_gate, full_up = (x @ gate_up.T).chunk(2, dim=-1)
        torch.testing.assert_close(mlp(layer, x), (torch.nn.functional.silu(full_gate) * full_up) @ masked.T)


def test_the_learned_policy_preserves_the_spectrum_better_than_it_started():
    # Rows of very different norms: which rows are kept moves the singular values a lot.
    g = torch.Generator().manual_seed(0)
    gates = [torch.randn(128, 32, generator=g) * torch.logspace(-1, 1, 128)[torch.randperm(128, generator=g), None]
             for _ in range(3)]
    untrained, _ = learn_policy(gates, 64, 1, 16, 0.0, seed=0, progress=False)  # lr 0: the initial policy
    trained, history = learn_policy(gates, 64, 100, 16, 0.05, seed=0, progress=False)

    def ks(policy) -> float:
        with torch.no_grad():
            return sum(ks_distance(spectrum(w[policy(w).topk(64).indices]), spectrum(w)) for w in gates)

    assert ks(trained) < 0.6 * ks(untrained)  # 0.69 against 1.31 (random rows: 1.16)
    assert sum(history[-10:]) > sum(history[:10])  # rewards (−KS) rose while it learned


def test_quantizers_follow_it_on_the_smaller_layers_whatever_the_written_order():
    loaded = loaded_tiny()
    reports = compress(loaded, "int4:group=32+" + FAST)
    assert [r.stage for r in reports] == ["slice", "quantize"]
    down = loaded.model.layers[0].down
    assert isinstance(down, Int4Linear) and down.in_features == 96
    assert weight_nbytes(down) < 64 * 128 * 4 * 0.75 / 4  # int4 of the already narrower layer


def test_decoding_a_pruned_bf16_model_with_an_int8_chain_matches_its_full_forward():
    # int8 layers take the one-call C decoder layers where they build (head_dim 32 here); those take the
    # config's MLP width, so a narrower MLP must run on its own.
    model = random_model("llama", seed=3, hidden_size=128, num_attention_heads=4).to(torch.bfloat16)
    loaded = LoadedModel(model, None, model.config, "tiny", "tiny", torch.bfloat16, torch.device("cpu"))
    compress(loaded, FAST + "+int8")
    spec = RunSpec(max_new_tokens=8, decode=TechniqueSpec.parse("plain"))
    tokens = [t for e in Engine(loaded.model, spec).run(PROMPTS[0]) for t in e.tokens]
    ids = torch.tensor(PROMPTS[0] + tokens[:-1])
    logits = loaded.model(ids, torch.arange(len(ids))).logits
    assert logits[len(PROMPTS[0]) - 1:].argmax(-1).tolist() == tokens


@pytest.mark.parametrize("text, message", [
    ("prunenet:head=true", "head=true does not apply"),
    ("prunenet:ratio=0.95,multiple=64", "keeps 0 of 128 MLP channels"),
    ("prunenet:multiple=16,episodes=1+int4+eora:tokens=64,rank=4", "changed their shapes"),
    ("prunenet:layers=9", "outside this model's decoder layers 0-3"),
])
def test_bad_settings_are_refused_in_one_line(text, message):
    with pytest.raises(SpecError, match=message):
        compress(loaded_tiny(), text)


def test_kept_count_rounds_to_the_multiple():
    assert kept_count(1536, 0.3, 64) == 1088 and kept_count(1536, 0.25, 128) == 1152
    assert [s.name for s in linear_sites(loaded_tiny().model, head=False)][2:4] == ["layers.0.gate_up",
                                                                                     "layers.0.down"]


def test_the_spectrum_of_a_tall_matrix_is_its_singular_values():
    w = torch.randn(96, 32)
    expected = torch.linalg.svdvals(w).sort().values
    torch.testing.assert_close(spectrum(w), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(spectrum(w.T), expected, atol=1e-4, rtol=1e-4)
