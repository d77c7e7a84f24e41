"""Double sparsity's offline calibration (CachePolicy.prepare): once per model, kept in memory, the paper's
statistic; and decoding with it: budget 1 is dense, a lossless drafter keeps plain decoding's output."""

import pytest
import torch

from workbench.api import Workbench
from workbench.cache import double_sparsity as ds
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.eval.quality import teacher_forced
from workbench.models.random import random_model
from workbench.spec import RunSpec, TechniqueSpec

from .helpers import PROMPTS, varied_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = PROMPTS[0] + PROMPTS[1]  # repeats (prompt lookup finds drafts) and varies


@pytest.fixture(scope="module")
def model():
    return varied_model("llama")


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """Counts offline calibrations."""
    counted: list[int] = []
    real = ds.calibrate

    def counting(model, tokenizer):
        counted.append(1)
        return real(model, tokenizer)

    monkeypatch.setattr(ds, "calibrate", counting)
    return counted


def policy(**params) -> TechniqueSpec:
    return TechniqueSpec("double_sparsity", {"channels": 4, **params})


def tokens(model, spec: RunSpec, memory: dict | None = None) -> list[int]:
    return [t for e in Engine(model, spec, memory=memory).run(PROMPT) for t in e.tokens]


def direct_importance(model, ids: torch.Tensor) -> torch.Tensor:
    """The paper's statistic computed apart from the observer: q and k read from each layer's fused projection
    (forward hooks), rotated here, then per kv head and channel mean_t |q_t k_t| summed over the head's group.
    One block of `ids` from position 0. Returns [layers, kv_heads, dim]."""
    c = model.config
    captured = []
    hooks = [layer.qkv.register_forward_hook(lambda m, i, out: captured.append(out)) for layer in model.layers]
    with torch.inference_mode():
        model(ids, torch.arange(len(ids)))
    for h in hooks:
        h.remove()
    freqs = torch.arange(len(ids), dtype=torch.float32)[:, None] * model.inv_freq  # [T, dim / 2]
    cos, sin = torch.cat((freqs, freqs), -1).cos()[:, None], torch.cat((freqs, freqs), -1).sin()[:, None]

    def rotate(x):  # x: [T, heads, dim]; RoPE in Hugging Face's rotate_half form
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    out = []
    for qkv in captured:
        qkv = qkv.float().view(len(ids), c.num_heads + 2 * c.num_kv_heads, c.head_dim)
        q, k = rotate(qkv[:, :c.num_heads]), rotate(qkv[:, c.num_heads:c.num_heads + c.num_kv_heads])
        group = c.num_heads // c.num_kv_heads
        out.append(torch.stack([sum((q[:, g * group + j] * k[:, g]).abs().mean(0) for j in range(group))
                                for g in range(c.num_kv_heads)]))
    return torch.stack(out)


def test_offline_calibration_runs_once_per_model_and_is_kept_in_memory(model, calls):
    memory: dict = {}
    first = tokens(model, RunSpec(max_new_tokens=6, cache=[policy(budget=0.5)]), memory)
    assert len(calls) == 1 and ds.MEMORY_KEY in memory
    kept = memory[ds.MEMORY_KEY]
    assert tokens(model, RunSpec(max_new_tokens=6, cache=[policy(budget=0.5)]), memory) == first
    tokens(model, RunSpec(max_new_tokens=6, cache=[policy(budget=0.5, channels=8)]), memory)  # same ranking
    assert len(calls) == 1 and memory[ds.MEMORY_KEY] is kept
    tokens(model, RunSpec(max_new_tokens=6, cache=[policy(budget=0.5)]))  # an engine without shared memory
    assert len(calls) == 2


def test_the_workbench_and_the_evaluation_calibrate_once_per_loaded_model(calls):
    wb = Workbench("random:llama", dtype="float32", device="cpu")
    spec = wb.spec(cache=[policy(budget=0.5)], max_new_tokens=4)
    wb.generate(" ".join(map(str, PROMPT)), spec)
    wb.generate(" ".join(map(str, PROMPT[:20])), spec)
    assert len(calls) == 1 and ds.MEMORY_KEY in wb.memory(spec)
    loaded, memory = wb.model(spec), wb.memory(spec)
    for seed in (1, 2):  # teacher-forced windows, as `workbench eval` runs them, share the same memory
        ids = torch.randint(3, 500, (80,), generator=torch.Generator().manual_seed(seed)).tolist()
        teacher_forced(loaded.model, [spec.cache[0].build("cache")], ids, 60, loaded.tokenizer, memory)
    assert len(calls) == 1


def test_offline_channels_are_the_papers_statistic_on_the_calibration_ids(model):
    importance, source = ds.calibrate(model, None)
    assert "seeded random" in source
    ids, _ = ds.calibration_ids(model, None)
    block = ds.CALIBRATION_BLOCK
    direct = torch.stack([direct_importance(model, ids[i:i + block]) for i in range(0, len(ids), block)]).mean(0)
    assert torch.allclose(importance, direct, rtol=1e-4, atol=1e-6)
    assert torch.equal(ds.top_channels(importance, 4), ds.top_channels(direct, 4))
    # what the engine's layer caches hold is that ranking's top `channels` per kv head
    memory: dict = {}
    engine = Engine(model, RunSpec(max_new_tokens=1, cache=[policy(budget=0.5)]), memory=memory)
    engine.policies[0].prepare(model, None, memory)
    layer_cache = engine.policies[0].make_layer_cache(2, model.config, model.dtype, model.device, 8)
    assert torch.equal(layer_cache.channels, ds.top_channels(direct[2], 4))


def test_offline_channels_generalise_beyond_the_calibration_text_better_than_random_ones(model):
    """The paper's premise: the outlier channels are static, so those calibrated on one text carry more of
    |q k| on other text than random channels do."""
    chosen = ds.top_channels(ds.calibrate(model, None)[0], 4)  # [layers, kv_heads, 4]
    held_out = direct_importance(model, torch.randint(0, 512, (256,), generator=torch.Generator().manual_seed(9)))
    share = lambda picks: (held_out.gather(-1, picks).sum(-1) / held_out.sum(-1)).mean()  # noqa: E731
    g = torch.Generator().manual_seed(0)
    random_picks = [torch.rand(held_out.shape, generator=g).topk(4, -1).indices for _ in range(50)]
    assert not any(torch.equal(chosen.sort(-1).values, p.sort(-1).values) for p in random_picks)
    assert share(chosen) > max(share(p) for p in random_picks)


def test_a_tokenizer_calibrates_on_the_calibration_text_not_the_evaluation_text(model):
    seen = []

    def tokenizer(text):
        seen.append(text)
        return {"input_ids": [ord(ch) % 500 for ch in text]}

    ids, source = ds.calibration_ids(model, tokenizer)
    from workbench.text import calibration_text, evaluation_text

    assert len(ids) == ds.CALIBRATION_TOKENS and "calibration_text()" in source
    assert calibration_text().startswith(seen[0]) and seen[0] not in evaluation_text()


def test_budget_one_gives_plain_dense_output(model):
    plain = tokens(model, RunSpec(max_new_tokens=24))
    for calibration in ("offline", "prompt"):
        assert tokens(model, RunSpec(max_new_tokens=24, cache=[policy(budget=1.0, calibration=calibration)])) == plain


@pytest.mark.parametrize("calibration", ["offline", "prompt"])
def test_prompt_lookup_keeps_plain_decodings_output_under_the_policy(calibration):
    model = random_model("llama", seed=7)  # unscaled weights: its output repeats, so drafts get accepted
    cache = [policy(budget=0.3, calibration=calibration)]
    plain = tokens(model, RunSpec(max_new_tokens=30, cache=cache))
    events = list(Engine(model, RunSpec(max_new_tokens=30, cache=cache, decode=TechniqueSpec("prompt_lookup")))
                  .run(PROMPT))
    assert [t for e in events for t in e.tokens] == plain
    assert sum(e.n_accepted for e in events) > 0  # draft trees were verified and kept
    assert plain != tokens(model, RunSpec(max_new_tokens=30))  # the budget did change what was attended


def test_the_prompt_option_calibrates_on_the_prefill(model, calls):
    engine = Engine(model, RunSpec(max_new_tokens=3, cache=[policy(budget=0.5, calibration="prompt")]))
    out = [t for e in engine.run(PROMPT) for t in e.tokens]
    assert len(out) == 3 and calls == [] and engine.policies[0].importance is None


@pytest.mark.parametrize("params, message", [({"calibration": "pile"}, "calibration"),
                                             ({"channels": 0}, "channels"), ({"budget": 0.0}, "budget")])
def test_bad_params_are_refused(params, message):
    with pytest.raises(SpecError, match=message):
        RunSpec(cache=[TechniqueSpec("double_sparsity", params)]).validated()


def test_more_channels_than_the_head_has_are_refused(model):
    with pytest.raises(SpecError, match="exceeds this model's head_dim"):
        tokens(model, RunSpec(max_new_tokens=2, cache=[policy(channels=model.config.head_dim + 1)]))
