"""`workbench eval`: the teacher-forced protocol, KL and agreement, retrieval probes, the kvpress peer, the CLI."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
import torch

from tests.helpers import varied_model
from workbench import registry
from workbench.cache.base import CachePolicy, KVCache
from workbench.cache.dense import DensePolicy
from workbench.cli import main
from workbench.eval import kvpress_peer, retrieval
from workbench.eval.quality import compare, kl_per_token, nll, teacher_forced
from workbench.eval.report import markdown, write
from workbench.eval.runner import EvalOptions, plan_runs
from workbench.models.hf import read_hf
from workbench.models.weights import model_from_hf_state_dict
from workbench.registry import param

RANDOM = ["--model", "random:llama", "--dtype", "float32"]


@dataclass
class KeepEnds(CachePolicy):
    """Stand-in for StreamingLLM as kvpress's press does it: after the prefill, keep the first `sinks` tokens
    and the most recent ones, int(n * budget) in all; nothing is evicted while decoding."""

    budget: float = param(0.5, "fraction of the context's tokens kept", min=0.0, max=1.0)
    sinks: int = param(4, "first tokens always kept", min=0)

    def on_prefill_end(self, cache: KVCache) -> None:
        for layer in cache.layers:
            n = layer.n_committed
            kept = int(n * self.budget)
            layer.keep(torch.cat([torch.arange(self.sinks), torch.arange(n - (kept - self.sinks), n)]))


@dataclass
class MaskOnly(CachePolicy):
    """Stand-in for a simulated policy: changes nothing, but says it only masks."""

    simulated = True


@pytest.fixture
def stand_ins(monkeypatch):
    """Register the stand-in policies for one test only (the registry is global)."""
    for name, cls in (("_test_keep_ends", KeepEnds), ("_test_mask_only", MaskOnly)):
        monkeypatch.setitem(registry._registry["cache"], name, registry.Technique("cache", name, cls, None))


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def random_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- the protocol ---------------------------------------------------------------------------------------

def test_dense_protocol_equals_one_full_forward(one_thread):
    """Prefill + one token per step through the dense cache scores the same tokens as one causal forward."""
    model = varied_model()
    ids = random_ids(80)
    prefill = 56
    run = teacher_forced(model, [DensePolicy()], ids, prefill)
    tokens = torch.tensor(ids)
    full = torch.log_softmax(model(tokens, torch.arange(len(ids))).logits, dim=-1)[prefill - 1:-1]
    assert run.logprobs.shape == (len(ids) - prefill, model.config.vocab_size)
    assert torch.equal(run.targets, tokens[prefill:])
    torch.testing.assert_close(run.logprobs, full, atol=1e-4, rtol=0)
    ppl_full = float(torch.exp(-full.gather(1, tokens[prefill:, None]).mean()))
    ppl_ours = compare([run], [run])["perplexity"]
    assert abs(ppl_ours - ppl_full) / ppl_full < 1e-4
    assert run.cache_bytes_end > run.cache_bytes_prefill > 0


def test_kl_of_the_reference_against_itself_is_zero(one_thread):
    model = varied_model()
    ref = teacher_forced(model, [], random_ids(60), 40)
    metrics = compare([ref], [ref])
    assert metrics["kl"] == 0 and metrics["top1_agreement"] == 1 and metrics["delta_nll"] == 0
    assert metrics["delta_ppl_pct"] == 0 and metrics["scored_tokens"] == 20


def test_dropping_tokens_raises_kl_and_lowers_bytes(one_thread):
    model = varied_model()
    ids = random_ids(96, seed=3)
    ref = teacher_forced(model, [], ids, 64)
    kl = {}
    for budget in (0.25, 0.75):
        run = teacher_forced(model, [KeepEnds(budget=budget)], ids, 64)
        kl[budget] = compare([ref], [run])["kl"]
        assert run.cache_bytes_prefill == pytest.approx(ref.cache_bytes_prefill * budget, rel=0.02)
        assert (kl_per_token(ref, run) >= 0).all()
    assert kl[0.25] > kl[0.75] > 1e-4


def test_compare_refuses_runs_over_different_tokens(one_thread):
    model = varied_model()
    a = teacher_forced(model, [], random_ids(40, seed=1), 30)
    b = teacher_forced(model, [], random_ids(40, seed=2), 30)
    with pytest.raises(ValueError, match="different tokens"):
        compare([a], [b])


def test_nll_is_the_log_probability_of_the_true_token(one_thread):
    run = teacher_forced(varied_model(), [], random_ids(30), 20)
    assert torch.equal(nll(run), -run.logprobs[torch.arange(10), run.targets])


# ---- retrieval --------------------------------------------------------------------------------------------

def words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_probe_puts_the_key_at_the_asked_depth(depth):
    probe = retrieval.passkey_probe(400, depth, 48213, words)
    before, needle, after = probe.prompt.partition("The pass key is 48213.")
    assert needle and probe.expected == "48213"
    n_before, n_after = before.count(retrieval.PASSKEY_FILLER), after.count(retrieval.PASSKEY_FILLER)
    units = n_before + n_after
    assert n_before == round(depth * units) and probe.depth == pytest.approx(depth, abs=1 / units)
    unit = words(retrieval.PASSKEY_FILLER)
    assert 400 - unit < words(probe.prompt) <= 400  # as long as whole filler units allow
    assert probe.prompt.endswith("The pass key is")


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_kv_probe_asks_for_the_pair_at_the_asked_depth(depth):
    probe = retrieval.kv_probe(300, depth, seed=5, count=words)
    body = probe.prompt.split("JSON data:\n")[1].split("\n\nKey:")[0]
    pairs = list(json.loads(body).items())
    asked = re.search(r'Key: "([0-9a-f]{8})"', probe.prompt).group(1)
    index = [k for k, _ in pairs].index(asked)
    assert pairs[index][1] == probe.expected
    assert index == round(depth * (len(pairs) - 1)) and len(pairs) > 10
    assert words(probe.prompt) <= 300


def test_a_probe_longer_than_asked_is_refused():
    with pytest.raises(Exception, match="needs at least"):
        retrieval.passkey_probe(10, 0.5, 12345, words)


@pytest.mark.parametrize("answer, expected, right", [
    (" 48213. What", "48213", True),
    (" 482130", "48213", False),
    (" 4821", "48213", False),
    ("The pass key is 148213", "48213", False),
    (' "a1b2c3d4"\n', "a1b2c3d4", True),
    (' "a1b2c3d5"', "a1b2c3d4", False),
])
def test_the_scorer_tells_right_from_wrong(answer, expected, right):
    assert retrieval.is_correct(answer, expected) is right


def test_retrieval_summary_counts_by_length_and_depth():
    cells = [{"length": n, "depth": d, "trial": 0, "correct": ok}
             for n, d, ok in [(100, 0.0, True), (100, 1.0, False), (200, 0.0, True), (200, 1.0, True)]]
    summary = retrieval.summarize(cells)
    assert summary["accuracy"] == 0.75
    assert summary["by_length"] == {"100": 0.5, "200": 1.0} and summary["by_depth"] == {"0.0": 1.0, "1.0": 0.5}


# ---- the kvpress peer -------------------------------------------------------------------------------------

def test_kvpress_streaming_matches_the_same_method_through_our_cache(tmp_path, tiny_transformers_model, one_thread):
    """The peer's protocol lines up with ours: StreamingLLMPress on transformers and the same eviction through
    our cache score the continuation alike (float32), and both hold half the tokens after the prefill."""
    theirs = tiny_transformers_model("llama")
    theirs.save_pretrained(tmp_path)
    config, state, _ = read_hf(tmp_path)
    ours_model = model_from_hf_state_dict(config, state, torch.float32, "cpu")
    ids, prefill = random_ids(72, seed=4), 48
    press, exact = kvpress_peer.press_for("streaming", KeepEnds(budget=0.5, sinks=4), 0.5)
    assert exact and press.n_sink == 4 and press.compression_ratio == 0.5
    reference = teacher_forced(ours_model, [], ids, prefill)
    ours = teacher_forced(ours_model, [KeepEnds(budget=0.5, sinks=4)], ids, prefill)
    peer = kvpress_peer.peer_forced(theirs, press, ids, prefill)
    peer_full = kvpress_peer.peer_forced(theirs, None, ids, prefill)
    torch.testing.assert_close(peer.logprobs, ours.logprobs, atol=1e-4, rtol=0)
    assert compare([reference], [peer])["kl"] > 1e-4  # the press did compress
    # k and v only (our dense cache also keeps 8 bytes of position per token and kv head)
    kv_bytes = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4
    assert peer.cache_bytes_prefill == kv_bytes * (prefill // 2)
    assert peer_full.cache_bytes_prefill == kv_bytes * prefill
    verdict = kvpress_peer.agreement([ours], [peer], [reference], [peer_full])
    assert verdict["agrees"] and abs(verdict["nll_gap"]) < 1e-4
    assert kvpress_peer.press_for("kivi", object(), 0.5) is None


@dataclass
class SnapKVLike:
    window: int = 8
    kernel: int = 3
    pooling: str = "avg"


@pytest.mark.parametrize("name, policy, press_name, exact", [
    ("snapkv", SnapKVLike(), "SnapKVPress", True),
    ("h2o", object(), "ObservedAttentionPress", False),  # needs eager attention: the peer switches to it
])
def test_every_mapped_press_runs_and_halves_the_cache(name, policy, press_name, exact, tiny_transformers_model,
                                                      one_thread):
    theirs = tiny_transformers_model("llama")
    press, same = kvpress_peer.press_for(name, policy, 0.5)
    assert type(press).__name__ == press_name and same is exact
    if name == "snapkv":
        assert (press.window_size, press.kernel_size) == (8, 3)
        assert kvpress_peer.press_for(name, SnapKVLike(pooling="max"), 0.5)[1] is False  # kvpress averages
    ids, prefill = random_ids(60, seed=2), 40
    full = kvpress_peer.peer_forced(theirs, None, ids, prefill)
    run = kvpress_peer.peer_forced(theirs, press, ids, prefill)
    assert run.cache_bytes_prefill == full.cache_bytes_prefill // 2
    assert run.cache_bytes_end - run.cache_bytes_prefill == full.cache_bytes_end - full.cache_bytes_prefill
    assert compare([full], [run])["kl"] > 0


def test_agreement_flags_a_different_method(tiny_transformers_model, tmp_path, one_thread):
    theirs = tiny_transformers_model("llama")
    theirs.save_pretrained(tmp_path)
    config, state, _ = read_hf(tmp_path)
    ours_model = model_from_hf_state_dict(config, state, torch.float32, "cpu")
    ids, prefill = random_ids(72, seed=4), 48
    press, _ = kvpress_peer.press_for("streaming", KeepEnds(), 0.25)
    reference = teacher_forced(ours_model, [], ids, prefill)
    peer = kvpress_peer.peer_forced(theirs, press, ids, prefill)
    verdict = kvpress_peer.agreement([reference], [peer], [reference], [reference])  # full cache vs 25%
    assert not verdict["agrees"]


# ---- planning and the table -------------------------------------------------------------------------------

def test_budgets_expand_only_policies_with_a_budget(stand_ins):
    runs = plan_runs(EvalOptions(model="random:llama", cache=["_test_keep_ends", "_test_mask_only",
                                                              "_test_keep_ends:budget=0.3+_test_mask_only"],
                                 budgets=[0.25, 0.5], compress=[], combine=False))
    assert [(r.kind, r.budget) for r in runs] == [("reference", None), ("cache", 0.25), ("cache", 0.5),
                                                  ("cache", None), ("cache", 0.3)]
    assert runs[1].cache[0].params == {"budget": 0.25} and runs[1].series == "_test_keep_ends"
    assert runs[4].label == "cache=_test_keep_ends:budget=0.3+_test_mask_only"  # an explicit budget is kept
    default = plan_runs(EvalOptions(model="random:llama", cache=["_test_keep_ends"]))
    assert default[1].budget == 0.5  # the policy's own default


@pytest.mark.parametrize("spec, message", [
    ("_test_keep_ends:budget=abc", "budget='abc' is not a valid float"),
    ("_test_keep_ends:bits=2", "has no parameter 'bits'"),
])
def test_bad_parameters_in_a_cache_chain_are_one_line_errors(capsys, stand_ins, spec, message):
    code, _, err = run_cli(capsys, "eval", *RANDOM, "--cache", spec)
    assert code == 2 and err.count("\n") == 1 and message in err


def test_the_table_puts_each_peer_under_its_run_and_flags_disagreement():
    ours = {"engine": "workbench", "label": "cache=streaming:fraction=0.5", "kind": "cache", "budget": 0.5,
            "perplexity": 15.0, "delta_ppl_pct": 10.0, "kl": 0.06, "top1_agreement": 0.9}
    peer = {"engine": "kvpress", "label": "kvpress: StreamingLLMPress", "kind": "peer", "budget": 0.5,
            "peer_of": ours["label"], "same_method": True, "agrees": False, "nll_gap": 0.2, "nll_gap_se": 0.01,
            "kl_gap": 0.1, "kl_gap_se": 0.01, "kl_full_cache_floor": 0.001, "perplexity": 18.0}
    other = {**ours, "label": "cache=h2o:fraction=0.5"}
    result = {"model": "m", "dtype": "bfloat16", "device": "cpu", "hardware": "h", "text": "t", "text_hash": "x",
              "context": 64, "prefill": 48, "scored": 16, "windows": 1, "tasks": ["ppl"],
              "retrieval": {"lengths": [64]}, "rows": [ours, other, peer]}
    table = markdown(result)
    lines = [line for line in table.splitlines() if line.startswith("| cache=") or line.startswith("| kvpress")]
    assert [line.split(" | ")[0] for line in lines] == ["| cache=streaming:fraction=0.5",
                                                        "| kvpress: StreamingLLMPress", "| cache=h2o:fraction=0.5"]
    assert "**NO**" in lines[1] and "DISAGREEMENT: cache=streaming:fraction=0.5" in table


def test_compression_rows_get_weight_columns_and_two_plots(tmp_path):
    base = {"engine": "workbench", "kind": "reference", "label": "full (dense, uncompressed)", "compress": "none",
            "perplexity": 14.0, "kl": 0.0, "weight_bytes": 270 * 2**20, "decode_tok_per_s": 30.0}
    int8 = {**base, "kind": "compress", "label": "compress=int8", "compress": "int8", "perplexity": 14.1,
            "kl": 0.01, "weight_bytes": 140 * 2**20, "weight_ratio": 0.52, "decode_tok_per_s": 55.0,
            "load_and_apply_s": 3.5, "apply_s": 2.5}
    result = {"model": "m", "dtype": "bfloat16", "device": "cpu", "hardware": "cpu (2 threads)", "text": "t",
              "text_hash": "x", "context": 64, "prefill": 48, "scored": 16, "windows": 1, "tasks": ["ppl"],
              "retrieval": {"lengths": [64]}, "rows": [base, int8]}
    paths = write(result, tmp_path / "c.json")
    assert [p.name for p in paths] == ["c.json", "c.md", "c_size_vs_quality.png", "c_speed_vs_quality.png"]
    table = (tmp_path / "c.md").read_text()
    assert "| decode tok/s | weight bytes | apply s |" in table
    assert "| 55 | 140.00 MiB (52.0%) | 2.5 |" in table and "measured on this machine (cpu (2 threads))" in table


# ---- the command line -------------------------------------------------------------------------------------

def test_eval_prints_a_table_and_writes_json_and_plots(capsys, tmp_path, stand_ins, one_thread):
    out = tmp_path / "eval.json"
    code, table, err = run_cli(capsys, "eval", *RANDOM, "--context", "96", "--scored", "12", "--cache",
                               "_test_keep_ends", "--cache", "_test_mask_only", "--budgets", "0.5,0.75",
                               "--out", str(out))
    assert code == 0, err
    assert "| run | budget | perplexity |" in table and "cache=_test_keep_ends:budget=0.5" in table
    assert "[simulated]" in table and "hash `" in table
    result = json.loads(out.read_text())
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == ["full (dense, uncompressed)", "cache=_test_keep_ends:budget=0.5",
                          "cache=_test_keep_ends:budget=0.75", "cache=_test_mask_only"]
    ref, half = rows["full (dense, uncompressed)"], rows["cache=_test_keep_ends:budget=0.5"]
    assert ref["kl"] == 0 and half["kl"] > 0 and half["budget"] == 0.5
    assert half["cache_ratio_prefill"] == pytest.approx(0.5, abs=0.02)
    assert rows["cache=_test_mask_only"]["simulated"] and rows["cache=_test_mask_only"]["kl"] == 0
    assert result["text_hash"] and result["scored"] == 12 and result["prefill"] == 84
    assert out.with_suffix(".md").read_text().startswith("model `random:llama`")
    assert (tmp_path / "eval_quality_vs_bytes.png").stat().st_size > 1000


def test_eval_retrieval_on_a_byte_level_model(capsys, tmp_path, one_thread):
    code, out, err = run_cli(capsys, "eval", *RANDOM, "--tasks", "passkey,kv", "--lengths", "300", "--depths",
                             "0,1", "--json")
    assert code == 0, err
    row = json.loads(out)["rows"][0]
    assert [c["depth"] for c in row["passkey"]["cells"]] == [0.0, 1.0]
    assert set(row["kv"]["by_length"]) == {"300"} and "perplexity" not in row


@pytest.mark.parametrize("args, message", [
    (["--cache", "nope"], "unknown cache technique 'nope'"),
    (["--cache", "dense", "--budgets", "1.5"], "budget 1.5 is out of range"),
    (["--cache", "dense", "--budgets", "0"], "budget 0.0 is out of range"),
    (["--cache", "dense", "--budgets", "half"], "--budgets takes comma-separated floats"),
    (["--cache", "dense", "--budgets", "0.5"], "no --cache policy takes a fraction of the context"),
    (["--context", "1024"], "longer than the model's context window (512)"),
    (["--context", "128", "--scored", "128"], "--scored must be between 1 and context - 1 = 127"),
    (["--tasks", "ppl,mmlu"], "unknown tasks ['mmlu']"),
    (["--peers", "vllm"], "unknown peers ['vllm']"),
    (["--tasks", "passkey", "--peers", "kvpress"], "add ppl to --tasks"),
    (["--tasks", "passkey", "--lengths", "20"], "a passkey prompt needs at least"),
    (["--compress", "nope"], "unknown compression technique 'nope'"),
])
def test_eval_errors_are_one_line_with_exit_code_2(capsys, args, message):
    code, _, err = run_cli(capsys, "eval", *RANDOM, *args)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


# ---- the embedded model (integration) ----------------------------------------------------------------------

@pytest.mark.integration
def test_embedded_smoke_with_the_kvpress_full_cache(capsys, tmp_path):
    """A short run on SmolLM2-135M in float32: real text has a sane perplexity, the passkey task runs, and
    transformers under kvpress (no press) scores the same tokens as our dense cache."""
    out = tmp_path / "smoke.json"
    code, _, err = run_cli(capsys, "eval", "--dtype", "float32", "--context", "192", "--scored", "8", "--tasks",
                           "ppl,passkey", "--lengths", "160", "--depths", "0.5", "--peers", "kvpress",
                           "--out", str(out))
    assert code == 0, err
    rows = json.loads(out.read_text())["rows"]
    ours, peer = rows[0], rows[-1]
    assert 1.5 < ours["perplexity"] < 60 and ours["kl"] == 0
    assert ours["passkey"]["cells"][0]["answer"]
    assert peer["engine"] == "kvpress" and peer["kl"] < 1e-3 and peer["top1_agreement"] == 1


def test_kvpress_peer_generate_is_greedy_decoding_over_the_pressed_cache(tiny_transformers_model, one_thread):
    """peer_generate without a press is transformers' own greedy generation; with one, its first token is the
    pressed prefill's argmax and the cache holds the kept half."""
    theirs = tiny_transformers_model("llama")
    ids = random_ids(48, seed=5)
    tokens, full_bytes = kvpress_peer.peer_generate(theirs, None, ids, 6)
    expected = theirs.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert tokens == expected[0, len(ids):].tolist()
    press, _ = kvpress_peer.press_for("streaming", KeepEnds(budget=0.5, sinks=4), 0.5)
    pressed, pressed_bytes = kvpress_peer.peer_generate(theirs, press, ids, 3)
    forced = kvpress_peer.peer_forced(theirs, press, [*ids, 0], len(ids))
    assert pressed[0] == int(forced.logprobs[0].argmax()) and len(pressed) == 3
    assert pressed_bytes == full_bytes // 2
