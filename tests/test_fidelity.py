"""Labels that must not lie: losslessness over every part of a run, simulated speed, clean summaries."""

import json

import pytest

from workbench import RunSpec, Workbench, registry
from workbench.cli import main


@pytest.mark.parametrize("technique", registry.techniques(), ids=lambda t: f"{t.category}:{t.name}")
def test_every_technique_declares_whether_it_changes_the_output(technique):
    assert technique.lossless in (True, False)
    assert technique.to_dict()["lossless"] is technique.lossless


def test_registering_without_a_declaration_is_refused():
    with pytest.raises(TypeError):
        registry.register("cache", "_undeclared")  # lossless is a required keyword
    with pytest.raises(TypeError, match="lossless must be True or False"):
        registry.register("cache", "_undeclared", lossless=None)


@pytest.mark.parametrize("spec, lossless", [
    ("", True),
    ("decode=prompt_lookup", True),
    ("decode=prompt_lookup;compress=dfloat11", True),
    ("cache=dense", True),
    ("decode=prompt_lookup;cache=kivi:bits=2;compress=int4:group=32", False),
    ("decode=prompt_lookup;cache=kivi:bits=2", False),
    ("decode=prompt_lookup;compress=int4:group=32", False),
    ("cache=snapkv", False),
    ("compress=prune", False),
    ("compress=prune:storage=dense", False),  # the zeros are kept, but they are zeros
    ("decode=token_recycling;accept=typical;temperature=0.7", False),
    ("decode=token_recycling;accept=typical", True),  # exact at temperature 0: it judges the run itself
])
def test_a_run_is_lossless_only_if_every_part_is(spec, lossless):
    assert RunSpec.parse(spec).validated().lossless is lossless


def test_list_json_declares_every_technique(capsys):
    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    entries = listed if isinstance(listed, list) else [t for ts in listed.values() for t in ts]
    assert {t["category"] for t in entries} == set(registry.CATEGORIES)
    assert all(isinstance(t["lossless"], bool) for t in entries)


@pytest.mark.parametrize("technique", registry.techniques(), ids=lambda t: f"{t.category}:{t.name}")
def test_summaries_print_on_one_clean_line(technique):
    summary = technique.summary
    assert summary and summary == " ".join(summary.split())


@pytest.fixture(scope="module")
def wb():
    return Workbench("random:llama", dtype="float32")


def test_the_summary_says_lossy_and_names_simulated_speed(wb):
    lossy = wb.generate("5 6 7 8", "max_new_tokens=4;decode=prompt_lookup;cache=kivi:bits=2;compress=fp4")
    summary = lossy.summary()
    assert summary["lossless"] is False
    assert "fp4" in summary["simulated"]
    plain = wb.generate("5 6 7 8", "max_new_tokens=4").summary()
    assert plain["lossless"] is True and plain["simulated"] == [] and plain["warm_start"] is False


def test_generate_json_carries_the_labels(capsys):
    code = main(["generate", "5 6 7 8", "--model", "random:llama", "--no-chat", "--json", "--no-store",
                 "--spec", "max_new_tokens=3;compress=fp4"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lossless"] is False and out["simulated"] == ["fp4"] and out["warm_start"] is False


@pytest.mark.integration
def test_bench_rows_carry_the_labels(tmp_path):
    out = tmp_path / "bench.json"
    fp4 = "fp4:calibrate=false,format=e2m1,steps=1"  # simulated speed; one format and clip ratio: quick to apply
    code = main(["bench", "--decode", "token_recycling:hot_start=true", "--decode", "token_recycling",
                 "--compress", fp4, "--categories", "qa", "--per-category", "1",
                 "--max-new-tokens", "4", "--peers", "", "--json", str(out), "--no-store"])
    assert code == 0
    rows = {r["engine"]: r for r in json.loads(out.read_text())["rows"] if r["category"] == "all"}
    assert all(r["simulated"] == [fp4] and r["lossless"] is False for r in rows.values())
    assert rows["token_recycling:hot_start=true"]["warm_start"] and not rows["token_recycling"]["warm_start"]
