"""The short fine-tune and the delta transforms (finetune, dare, compeft, adapter1bit) on a tiny random model
whose fine-tunes (full and LoRA, a few steps each) are cached once per module in a temporary folder."""

import math

import pytest
import torch

from workbench.compression.adapter1bit import OneBitLora, sign_dequantize, sign_quantize
from workbench.compression.base import apply_compression, linear_sites
from workbench.compression.compeft import CompeftDelta
from workbench.compression.dare import DareDelta
from workbench.compression.delta import DeltaLinear, delta_bytes, dense_entry, pack_bits, unpack_bits
from workbench.compression.int8 import Int8Linear
from workbench.errors import SpecError
from workbench.models import LoadedModel
from workbench.spec import TechniqueSpec
from workbench.training.checkpoints import save_checkpoint
from workbench.training.finetune import encoded, finetune, finetune_path, finetune_settings, heldout_loss, task_examples

from .helpers import varied_model

pytestmark = pytest.mark.usefixtures("one_thread")
VARIANT = "smollm"  # tied embeddings: a compressed LM head must not hide which model the delta belongs to


def tiny() -> LoadedModel:
    model = varied_model(VARIANT).float()
    return LoadedModel(model, None, model.config, "tiny", "tiny", torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The two fine-tunes' payloads, saved where the transforms look for them."""
    folder = tmp_path_factory.mktemp("finetunes")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("workbench.training.checkpoints.cache_root", lambda: folder)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        payloads = {}
        for mode in ("full", "lora", "lora1bit"):
            model = tiny().model
            settings = finetune_settings(mode, 16, "auto", len(model.layers))
            payloads[mode] = finetune(model, None, settings, minutes=1.0, max_steps=12, batch=2, lr=1e-2,
                                      heldout_examples=24, progress=False)
            save_checkpoint(finetune_path(model, settings), payloads[mode])
        torch.set_num_threads(threads)
        yield payloads


def compressed(text: str) -> LoadedModel:
    loaded = tiny()
    apply_compression(loaded, [TechniqueSpec.parse(t) for t in text.split("+")])
    return loaded


def heldout(loaded: LoadedModel) -> float:
    return heldout_loss(loaded.model, encoded(task_examples()[1][:24], None, loaded.config.vocab_size))


def name_of(loaded: LoadedModel, layer: DeltaLinear) -> str:
    return next(s.name for s in linear_sites(loaded.model, head=False) if s.module is layer)


def delta_layers(loaded: LoadedModel) -> list[DeltaLinear]:
    return [s.module for s in linear_sites(loaded.model, head=False) if isinstance(s.module, DeltaLinear)]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetune_lowers_heldout_loss_and_the_transform_applies_it(tuned, mode):
    report = tuned[mode]["report"]
    assert report["steps"] == 12
    assert report["tuned_loss"] < report["base_loss"] - 0.5
    loaded = compressed(f"finetune:tune={mode}")
    assert len(delta_layers(loaded)) == len(tuned[mode]["deltas"])
    assert heldout(loaded) == pytest.approx(report["tuned_loss"], abs=1e-3)


def test_adapter1bit_runs_what_the_quantization_aware_finetune_trained(tuned):
    report = tuned["lora1bit"]["report"]
    assert report["tuned_loss"] < report["base_loss"] - 0.5
    assert heldout(compressed("adapter1bit")) == pytest.approx(report["tuned_loss"], abs=1e-3)


def test_task_split_is_by_module():
    train_set, held_out = task_examples()
    module = lambda ex: ex.prompt.split()[1].split("(")[0].rsplit(".", 1)[0]  # noqa: E731
    assert len(held_out) > 50 and not {module(e) for e in train_set} & {module(e) for e in held_out}


def test_dare_with_p_zero_is_exact(tuned):
    exact, dare = compressed("finetune"), compressed("dare:p=0")
    ids = torch.arange(40) % 500
    torch.testing.assert_close(dare.model(ids, torch.arange(40)).logits, exact.model(ids, torch.arange(40)).logits)
    assert delta_bytes(dare.model)[0] == delta_bytes(exact.model)[0] + 8 * len(delta_layers(dare))


def test_dare_drops_and_rescales(tuned):
    loaded = compressed("dare:p=0.75,layers=3")
    for name, entry in tuned["full"]["deltas"].items():
        layer = dict((s.name, s.module) for s in linear_sites(loaded.model, head=False))[name]
        delta, decoded = dense_entry(entry), layer.codec.decode()
        if not name.startswith("layers.3."):  # outside `layers`: the delta as it is
            torch.testing.assert_close(decoded, delta)
            continue
        assert isinstance(layer.codec, DareDelta)
        kept = decoded != 0
        assert abs(kept.float().mean() - 0.25) < 0.05
        torch.testing.assert_close(decoded[kept], delta[kept] * 4)
        assert layer.codec.nbytes() == int(kept.sum()) * 4 + 8


def test_compeft_keeps_top_magnitudes_as_sign_and_scale_in_its_bytes(tuned):
    loaded = compressed("compeft:density=0.1")
    stored, reference = delta_bytes(loaded.model)
    assert stored < 0.1 * reference  # float32 here: (1 + 0.1) bits per entry of 32
    for layer in delta_layers(loaded):
        codec = layer.codec
        assert isinstance(codec, CompeftDelta)
        n = layer.out_features * layer.in_features
        k = round(0.1 * n)
        assert codec.nbytes() == math.ceil(n / 8) + math.ceil(k / 8) + 4
        decoded, delta = codec.decode(), layer.dequantized_weight() - layer.base.weight
        kept = decoded != 0
        assert int(kept.sum()) == k and torch.allclose(decoded[kept].abs(), codec.scale.expand(k))
        original = dense_entry(tuned["full"]["deltas"][name_of(loaded, layer)])
        assert original[kept].abs().min() >= original[~kept].abs().max()
        assert torch.equal(decoded[kept].sign(), original[kept].sign())
        torch.testing.assert_close(delta, decoded)


def test_delta_composes_with_a_compressed_base(tuned):
    loaded = compressed("int8:head=true+compeft:density=0.2")
    layers = delta_layers(loaded)
    assert layers and all(isinstance(m.base, Int8Linear) for m in layers)
    assert heldout(loaded) < tuned["full"]["report"]["base_loss"]


def test_adapter1bit_bytes_and_reconstruction(tuned):
    loaded = compressed("adapter1bit")
    for layer in delta_layers(loaded):
        codec = layer.codec
        assert isinstance(codec, OneBitLora)
        r = codec.a_scales.numel()
        bits = r * math.ceil(layer.in_features / 8) + r * math.ceil(layer.out_features / 8)
        assert codec.nbytes() == bits + 2 * r * 4
        assert layer.reference_nbytes == 4 * r * (layer.in_features + layer.out_features)
    entry = tuned["lora"]["deltas"]["layers.0.o"]
    a = entry["a"]
    signs, scales = sign_quantize(a, torch.float32)
    a_hat = sign_dequantize(signs, scales, a.shape[1])
    assert torch.equal(a_hat.sign(), torch.where(a >= 0, 1.0, -1.0))
    error = (a_hat - a).norm() / a.norm()
    assert error < 0.7  # a sign code of near-uniform entries
    for factor in (0.9, 1.1):  # the mean magnitude is the least-squares scale
        assert (a_hat * factor - a).norm() / a.norm() > error
    stored, reference = delta_bytes(loaded.model)
    assert stored < 0.05 * reference  # 1 bit of 32 plus the scales


def test_pack_bits_round_trips():
    bits = torch.rand(1001, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 126
    assert torch.equal(unpack_bits(packed, 1001), bits)


@pytest.mark.parametrize("text, message", [
    ("dare:p=1.5", "p"),
    ("compeft:density=0", "density"),
    ("adapter1bit:tune=full", "tune"),
])
def test_bad_parameters_are_refused(tuned, text, message):
    with pytest.raises(SpecError, match=message):
        compressed(text)


def test_a_missing_finetune_says_how_to_make_it(tuned):
    with pytest.raises(SpecError, match="workbench finetune --mode lora --rank 8"):
        compressed("dare:tune=lora,tune_rank=8")


def test_packed_examples_score_as_separate_forwards():
    loaded = tiny()
    examples = encoded(task_examples()[1][:6], None, loaded.config.vocab_size)
    separate = heldout_loss(loaded.model, examples, pack=1)
    assert heldout_loss(loaded.model, examples, pack=6) == pytest.approx(separate, rel=1e-5)


def test_adapter1bit_product_scales_fit_the_product_better(tuned):
    entry = tuned["lora"]["deltas"]["layers.1.gate_up"]
    product = entry["b"] @ entry["a"]
    errors = {fit: (OneBitLora(entry["a"], entry["b"], 1.0, torch.float32, fit).decode() - product).norm()
              for fit in ("factor", "product")}
    assert errors["product"] < errors["factor"] < product.norm()


@pytest.mark.integration
def test_embedded_model_finetune_and_dare(tmp_path, monkeypatch):
    """SmolLM2-135M: a few full fine-tune steps on its last layer lower the held-out loss, and the cached delta
    applies to the model loaded in bfloat16 (the float32 fine-tune's key), exactly under dare:p=0."""
    from workbench.models import load_model

    monkeypatch.setattr("workbench.training.checkpoints.cache_root", lambda: tmp_path)
    loaded = load_model("smollm2-135m", "float32", "cpu")
    settings = finetune_settings("full", 16, "29", len(loaded.model.layers))
    payload = finetune(loaded.model, loaded.tokenizer, settings, minutes=3.0, max_steps=4, batch=4, lr=1e-4,
                       heldout_examples=16, progress=False)
    assert payload["report"]["tuned_loss"] < payload["report"]["base_loss"]
    save_checkpoint(finetune_path(loaded.model, settings), payload)
    examples = encoded(task_examples()[1][:16], loaded.tokenizer, loaded.config.vocab_size)
    losses = {}
    for text in ("finetune:tune_layers=29", "dare:p=0,tune_layers=29"):
        model = load_model("smollm2-135m", "bfloat16", "cpu")
        apply_compression(model, [TechniqueSpec.parse(text)])
        assert len(delta_layers(model)) == 4
        losses[text] = heldout_loss(model.model, examples)
    assert losses["finetune:tune_layers=29"] == losses["dare:p=0,tune_layers=29"]
