"""PV-Tuning (`pvtune`) on tiny random models (seconds): the format and bytes stay, the subspace V step
changes only the codes the gradient chooses, and tuning lowers the calibration objective."""

import pytest
import torch

from workbench.compression.base import apply_compression, linear_sites, weight_nbytes
from workbench.compression.calibration import segments
from workbench.compression.int4 import LowBitLinear, quantize_rtn_int4
from workbench.compression.pvtune import TunableAffine
from workbench.errors import SpecError
from workbench.models import LoadedModel
from workbench.spec import TechniqueSpec

from .helpers import varied_model

pytestmark = pytest.mark.usefixtures("one_thread")
TUNE = "pvtune:steps=4,tokens=128,segment=64,lr=1e-3,tau=0.003"


def compressed(chain: str) -> LoadedModel:
    model = varied_model("llama").float()
    loaded = LoadedModel(model, None, model.config, "tiny", "tiny", torch.float32, torch.device("cpu"))
    apply_compression(loaded, [TechniqueSpec.parse(t) for t in chain.split("+")])
    return loaded


@torch.no_grad()
def calibration_kl(loaded: LoadedModel, n: int = 128) -> float:
    """KL from the uncompressed model on the calibration segments pvtune trains on (random ids here)."""
    reference = varied_model("llama").float()
    g = torch.Generator().manual_seed(0)  # CompressionContext.calibration_ids for a model without a tokenizer
    ids = torch.randint(0, loaded.config.vocab_size, (n,), generator=g)
    total = 0.0
    for seg in segments(ids, 64):
        pos = torch.arange(len(seg))
        ref = torch.log_softmax(reference(seg, pos).logits.float(), -1)
        logp = torch.log_softmax(loaded.model(seg, pos).logits.float(), -1)
        total += float(torch.nn.functional.kl_div(logp, ref, log_target=True, reduction="sum"))
    return total / len(ids)


def test_pvtune_keeps_the_format_and_bytes_and_lowers_the_calibration_kl():
    start, tuned = compressed("int4:bits=2,group=32"), compressed(f"int4:bits=2,group=32+{TUNE}")
    sites = linear_sites(tuned.model, head=False)
    assert all(isinstance(s.module, LowBitLinear) and s.module.bits == 2 for s in sites)
    assert sum(weight_nbytes(s.module) for s in sites) == sum(
        weight_nbytes(s.module) for s in linear_sites(start.model, head=False))
    assert tuned.model.dtype == torch.float32
    assert calibration_kl(tuned) < calibration_kl(start)


def test_v_step_changes_only_the_codes_with_the_largest_predicted_gain():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    codes, scales, offsets = quantize_rtn_int4(w, 32, torch.float32, 2)
    layer = TunableAffine(codes, scales, offsets, 32, 2, None)
    layer.track = True
    x = torch.randn(16, 64)
    (layer(x) ** 2).sum().backward()
    grad_q = (layer.w.grad.view(8, 2, 32) * scales[..., None]).view(8, 64)
    before = layer.codes.clone()
    changed = layer.v_step(eta=2.0, tau=0.05)
    moved = layer.codes != before
    assert 0 < changed == int(moved.sum()) <= int(0.05 * 8 * 64)
    delta = layer.codes.float() - before.float()
    assert (grad_q[moved] * delta[moved] < 0).all()  # every change goes down the gradient
    assert delta.abs().max() == 1  # one level at a time
    step = torch.clamp(torch.round(2.0 * grad_q / grad_q.pow(2).mean().sqrt()), -1, 1)
    target = torch.clamp(before.float() - step, 0, 3)
    gain = grad_q * (before.float() - target)
    assert gain[moved].min() >= gain[~moved].max()  # the chosen subset: the largest predicted decreases


def test_pvtune_needs_low_bit_layers():
    with pytest.raises(SpecError, match="no 2- or 3-bit layers"):
        compressed(TUNE)
    with pytest.raises(SpecError, match="head=true is not supported"):
        compressed(f"int4:bits=2,group=32+{TUNE},head=true")


def test_a_v_step_that_raises_the_loss_is_undone():
    """Moving every code a level down its gradient overshoots on this model; the step is undone, so the
    calibration KL never ends above the starting point's."""
    start = compressed("int4:bits=2,group=32")
    wild = compressed("int4:bits=2,group=32+pvtune:steps=1,p_steps=0,tokens=64,segment=64,tau=1.0,eta=100")
    assert calibration_kl(wild, 64) == calibration_kl(start, 64)
