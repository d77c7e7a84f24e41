"""The runtime and engine on a CUDA GPU: the same outputs as on the CPU. Runs where a GPU is present
(scripts/gpu_check.sh runs it on a lent GPU machine); CI machines have none, so it is skipped there."""

import pytest
import torch

from workbench.engine import Engine
from workbench.models.random import random_model
from workbench.spec import RunSpec

from .test_engine import PROMPT, RandomTreeDrafter, reference_greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(engine, prompt=PROMPT):
    return [t for e in engine.run(prompt) for t in e.tokens]


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
def test_cuda_logits_match_cpu_in_float32(variant):
    cpu = random_model(variant, seed=2)
    gpu = random_model(variant, seed=2).to("cuda")
    tokens = torch.randint(0, 512, (40,))
    a = cpu(tokens, torch.arange(40)).logits
    b = gpu(tokens.cuda(), torch.arange(40, device="cuda")).logits.cpu()
    assert (a - b).abs().max() < 1e-4


def test_cuda_greedy_and_tree_verification_match_cpu():
    cpu = random_model("llama", seed=1)
    gpu = random_model("llama", seed=1).to("cuda")
    truth = reference_greedy(cpu, PROMPT, 30)
    assert run(Engine(gpu, RunSpec(max_new_tokens=30))) == truth
    engine = Engine(gpu, RunSpec(max_new_tokens=30))
    engine.drafter = RandomTreeDrafter(truth, seed=4)
    assert run(engine) == truth


def test_cuda_bfloat16_runs_and_is_seeded():
    gpu = random_model("llama", seed=1, dtype=torch.bfloat16).to("cuda")
    spec = RunSpec(max_new_tokens=20, temperature=0.9, seed=5)
    assert run(Engine(gpu, spec)) == run(Engine(gpu, spec))


@pytest.mark.parametrize("decode", ["prompt_lookup", "token_recycling", "draft_model:layers=2"])
def test_cuda_drafters_are_lossless(decode):
    from workbench.spec import TechniqueSpec

    cpu = random_model("llama", seed=1)
    gpu = random_model("llama", seed=1).to("cuda")
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    plain = run(Engine(cpu, RunSpec(max_new_tokens=30)), prompt)
    assert run(Engine(gpu, RunSpec(max_new_tokens=30, decode=TechniqueSpec.parse(decode))), prompt) == plain


def test_cuda_speculative_sampling_is_seeded():
    from workbench.spec import TechniqueSpec

    gpu = random_model("llama", seed=1).to("cuda")
    spec = RunSpec(max_new_tokens=30, temperature=0.8, seed=2, decode=TechniqueSpec.parse("draft_model:layers=2"))
    assert run(Engine(gpu, spec)) == run(Engine(gpu, spec))
