"""RunSpec round trips and the registry's schema and validation."""

from dataclasses import dataclass

import pytest

from workbench import registry
from workbench.errors import SpecError
from workbench.registry import param, register
from workbench.spec import RunSpec, TechniqueSpec


@register("decoding", "_test_lookup", lossless=True)
@dataclass
class FakeLookup:
    """A stand-in drafter with one parameter of each type, to test the schema machinery."""

    k: int = param(8, "tokens per draft", min=1, max=64)
    threshold: float = param(0.5, "stop below this", min=0.0, max=1.0)
    adaptive: bool = param(False, "learn k online")
    mode: str = param("ngram", "how to match", choices=["ngram", "suffix"])

    def check(self):
        if self.adaptive and self.k < 2:
            raise ValueError("adaptive needs k >= 2")


def test_short_string_round_trip():
    spec = RunSpec(decode=TechniqueSpec("_test_lookup", {"k": 4, "mode": "suffix"}),
                   cache=[TechniqueSpec("dense"), TechniqueSpec("dense")], temperature=0.7, top_p=0.9,
                   stop=["\n\n", "a;b|c"], chat=False, max_new_tokens=10)
    text = spec.to_string()
    assert RunSpec.parse(text) == RunSpec.parse(RunSpec.parse(text).to_string())
    parsed = RunSpec.parse(text).validated()
    assert parsed == spec.validated()
    assert parsed.stop == ["\n\n", "a;b|c"]
    assert "decode=_test_lookup:k=4,mode=suffix" in text


def test_default_spec_is_the_empty_string():
    assert RunSpec().to_string() == ""
    assert RunSpec.parse("") == RunSpec()


def test_json_round_trip():
    spec = RunSpec(decode=TechniqueSpec("_test_lookup", {"k": 3}), accept=TechniqueSpec("match"), seed=5)
    assert RunSpec.from_json(spec.to_json()) == spec


def test_values_are_coerced_to_their_types():
    spec = RunSpec.parse("decode=_test_lookup:k=12,threshold=0.25,adaptive=true").validated()
    assert spec.decode.params == {"k": 12, "threshold": 0.25, "adaptive": True}


@pytest.mark.parametrize("text, message", [
    ("decode=nope", "unknown decoding technique 'nope'; valid: .*plain"),
    ("decode=_test_lookup:q=1", "no parameter 'q'; valid parameters: k \\(int"),
    ("decode=_test_lookup:k=0", "out of range; expected k \\(int, default 8 in \\[1, 64\\]\\)"),
    ("decode=_test_lookup:k=2.5", "not a valid int"),
    ("decode=_test_lookup:mode=regex", "not allowed; expected mode .*one of ngram/suffix"),
    ("decode=_test_lookup:adaptive=1,k=1", "adaptive needs k >= 2"),
    ("cache=nope", "unknown cache technique 'nope'; valid: .*dense, .*h2o"),
    ("compress=int9", "unknown compression technique 'int9'"),
    ("temperature=-1", "temperature must be >= 0"),
    ("top_p=0", "top_p must be in \\(0, 1\\]"),
    ("dtype=int3", "unknown dtype 'int3'; valid: auto, float32"),
    ("colour=blue", "bad spec field 'colour=blue'; expected key=value with key one of: model"),
    ("max_new_tokens=lots", "bad value for max_new_tokens"),
])
def test_bad_specs_say_what_is_valid(text, message):
    with pytest.raises(SpecError, match=message):
        RunSpec.parse(text).validated()


def test_schema_comes_from_dataclass_fields():
    technique = registry.get("decoding", "_test_lookup")
    params = {p.name: p for p in technique.params}
    assert params["k"].type == "int" and params["k"].default == 8 and params["k"].max == 64
    assert params["threshold"].type == "float"
    assert params["adaptive"].type == "bool"
    assert params["mode"].choices == ("ngram", "suffix")
    assert technique.to_dict()["lossless"] is True


def test_registered_techniques_are_complete():
    """Every registered technique documents itself and its parameters, and builds with its defaults."""
    for technique in registry.techniques():
        assert technique.summary, f"{technique.name} needs a docstring"
        for p in technique.params:
            assert p.help, f"{technique.name}.{p.name} needs help text"
        technique.build({})
        if technique.category in ("decoding", "acceptance"):
            assert technique.lossless is not None


def test_lossless_flag_follows_drafter_and_acceptor():
    assert RunSpec().lossless
    assert RunSpec.parse("decode=prompt_lookup").lossless
    assert not RunSpec.parse("decode=prompt_lookup;accept=typical;temperature=0.7").lossless
