"""The registry's matrices on a CUDA GPU: every lossless drafter, every cache policy and every weight transform
runs there, with the same guarantees as on the CPU (the CPU versions: test_lossless.py, test_cache_matrix.py,
test_compression.py, test_dfloat11.py).

Runs where a GPU is present (scripts/gpu_check.sh runs it on a lent GPU machine). CI machines have none; set
WORKBENCH_TEST_DEVICE=cpu to run the same file on the CPU, which checks the tests themselves.
"""

import os

import pytest
import torch

from workbench import registry
from workbench.compression.base import apply_compression
from workbench.engine import Engine
from workbench.kernels import dispatch
from workbench.models import LoadedModel
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import PROMPTS, varied_model
from .test_cache_matrix import CACHE_PARAMS, PROMPT, fraction_param
from .test_compression import (
    BF16_ONLY,
    TRANSFORMS,
    chain,
    delta_finetunes,  # noqa: F401  (autouse: the delta transforms' cached fine-tunes)
)
from .test_lossless import LOSSLESS
from .test_lossless import TEST_PARAMS as DECODE_PARAMS

DEVICE = torch.device(os.environ.get("WORKBENCH_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
POLICIES = [t.name for t in registry.techniques("cache") if not t.name.startswith("_")]
TREE_AND_CHAIN = ["token_recycling", "prompt_lookup", "draft_model"]


def decode(name: str) -> TechniqueSpec:
    return TechniqueSpec(name, DECODE_PARAMS.get(name, {}))


def generate(model, spec: RunSpec, prompts=PROMPTS) -> list[list[int]]:
    return [[t for e in Engine(model, spec).run(p) for t in e.tokens] for p in prompts]


@pytest.fixture(scope="module")
def model():
    return varied_model("llama").to(DEVICE)


@pytest.mark.parametrize("name", LOSSLESS)
def test_every_lossless_drafter_is_plain_decoding_on_the_device(model, name):
    """float32 greedy: tree and chain verification on the device give plain decoding's tokens there."""
    plain = generate(model, RunSpec(max_new_tokens=24))
    assert generate(model, RunSpec(max_new_tokens=24, decode=decode(name))) == plain


@pytest.mark.parametrize("policy", POLICIES)
def test_every_cache_policy_runs_with_tree_and_chain_drafters_on_the_device(model, policy):
    """Every policy completes with a tree drafter and two chain drafters; at budget 1 (nothing evicted) it
    gives dense plain decoding's tokens."""
    share = fraction_param(policy)  # the parameter keeping a fraction of the context
    full = {share: 1.0} if share else {}
    for drafter in TREE_AND_CHAIN:
        for params in ([{share: 0.5}, full] if full else [{}]):
            cache = [TechniqueSpec(policy, {**CACHE_PARAMS.get(policy, {}), **params})]
            tokens = generate(model, RunSpec(max_new_tokens=10, cache=cache, decode=decode(drafter)), [PROMPT])
            assert len(tokens[0]) == 10, (drafter, params)
            if params == full and full:
                assert tokens == generate(model, RunSpec(max_new_tokens=10), [PROMPT]), drafter


def _compressed(name: str, device: torch.device, dtype: torch.dtype = torch.float32):
    model = varied_model("llama").to(dtype).to(device)
    apply_compression(LoadedModel(model, None, model.config, "tiny", "tiny", dtype, device), chain(name))
    return model


@pytest.mark.parametrize("name", [n for n in TRANSFORMS if n not in BF16_ONLY])
def test_every_transform_runs_on_the_device_and_stays_lossless_under_drafters(name):
    """Compressed on the device (reference paths where the CPU kernels don't apply): its logits match the same
    transform applied on the CPU, and drafters verifying against it give its own plain decoding."""
    ours = _compressed(name, DEVICE)
    cpu = _compressed(name, torch.device("cpu"))
    tokens = torch.tensor(PROMPTS[1])
    with torch.inference_mode():
        a = ours(tokens.to(DEVICE), torch.arange(len(tokens), device=DEVICE)).logits.cpu()
        b = cpu(tokens, torch.arange(len(tokens))).logits
    assert (a - b).abs().max() <= 1e-3 * b.abs().max(), name
    plain = generate(ours, RunSpec(max_new_tokens=16))
    for drafter in TREE_AND_CHAIN:
        assert generate(ours, RunSpec(max_new_tokens=16, decode=decode(drafter))) == plain, drafter


def test_dfloat11_is_bit_exact_on_the_device(monkeypatch):
    if DEVICE.type == "cpu":  # the plain bf16 model's packed C products round in another order than the dense
        # product DFloat11's decoded weight feeds, so both take the reference here (on CUDA both are cuBLAS's)
        monkeypatch.setenv("WORKBENCH_KERNELS", "torch")
        monkeypatch.setattr(dispatch, "_resolved", {})  # resolved afresh; the other tests' resolutions come back
    reference = varied_model("llama").to(torch.bfloat16).to(DEVICE)
    encoded = _compressed("dfloat11", DEVICE, torch.bfloat16)
    tokens = torch.tensor(PROMPTS[1], device=DEVICE)
    positions = torch.arange(len(tokens), device=DEVICE)
    with torch.inference_mode():
        assert torch.equal(encoded(tokens, positions).logits, reference(tokens, positions).logits)
    spec = RunSpec(max_new_tokens=12, decode=TechniqueSpec.parse("token_recycling"))
    assert generate(encoded, spec) == generate(reference, spec)
