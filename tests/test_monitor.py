"""Monitor-guided decoding: the static analysis' masks, and runs that never emit a token the monitor masked."""

import pytest
import torch

from workbench.decoding.base import DecodeState
from workbench.decoding.monitor import CodeMonitor, MonitorAcceptance, TokenTable, code_of
from workbench.engine import Engine
from workbench.errors import SpecError
from workbench.models.random import random_model
from workbench.registry import get
from workbench.spec import RunSpec, TechniqueSpec

# A toy vocabulary of code pieces, repeated to the tiny model's 512 ids, so random outputs hit trigger points.
PIECES = ["<eos>", "import", " math", "\n", "x", " =", " x", ".", "sqrt", "sq", "rt", "foo", " foo", "pi",
          "(", ")", " +", " return", "def", " f", ":", "\n    ", " len", "zz", " 1", "math", " y", "y", " #"]
VOCAB = (PIECES * (512 // len(PIECES) + 1))[:512]


class ToyTokenizer:
    """Decodes ids to the toy pieces (a tokenizer needs only `decode` and `batch_decode` here)."""

    def decode(self, ids: list[int]) -> str:
        return "".join(VOCAB[i] for i in ids)

    def batch_decode(self, batch: list[list[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]


def monitor(names: bool = True) -> CodeMonitor:
    return CodeMonitor(TokenTable(PIECES), names)


def allowed(mask: torch.Tensor | None, *pieces: str) -> list[bool]:
    assert mask is not None
    return [not bool(mask[PIECES.index(p)]) for p in pieces]


def test_attribute_points_allow_only_the_members_of_a_standard_library_module():
    m = monitor()
    assert allowed(m.masked("import math\nx = math."), "sqrt", "sq", "pi", "foo", "zz", "(") == \
        [True, True, True, False, False, True]  # "sq" may become sqrt; "(" starts no identifier
    assert allowed(m.masked("import math\nx = math.sq"), "rt", "foo", "(") == [True, False, False]
    assert allowed(m.masked("import math\nx = math"), ".") == [True]  # a bare dot starts no identifier yet


def test_name_points_allow_names_in_scope_builtins_and_keywords():
    m = monitor()
    code = "def f(x):\n    y = x + 1\n    return"
    assert allowed(m.masked(code), " x", " y", " len", " foo", " 1") == [True, True, True, False, True]
    # the module scope does not see f's locals
    assert allowed(m.masked("def f(x):\n    foo = 1\nz = 2\nw ="), " x", " foo", " len") == [False, False, True]


def test_the_monitor_is_quiet_in_strings_comments_and_brackets_and_on_unknown_objects():
    m = monitor()
    assert m.masked("x = 1 # y =") is None
    assert m.masked("x = 'y =") is None
    assert m.masked("x = len(") is None  # a keyword argument's name is the callee's
    assert m.masked("def f(x):\n    return x.") is None  # a local's type is unknown
    assert monitor(names=False).masked("x = 1\ny =") is None


def test_classes_defined_in_the_code_have_their_body_names():
    code = "class A:\n    size = 1\n    def grow(self):\n        pass\n\nA."
    table = TokenTable(["size", "grow", "foo", "__init__"])
    mask = CodeMonitor(table, True).masked(code)
    assert mask.tolist() == [False, False, True, False]


def test_code_is_read_inside_the_open_fence():
    assert code_of("Here:\n```python\nimport math\nx = ", "fenced") == "import math\nx = "
    assert code_of("Here:\n```python\nx = 1\n```\nDone", "fenced") is None
    assert code_of("x = ", "all") == "x = "


def ids(text_pieces: list[str]) -> list[int]:
    return [PIECES.index(p) for p in text_pieces]


# Prompts that end where the monitor fires: attribute and name points, in module and function scope.
PROMPTS = [ids(["import", " math", "\n", "x", " =", " math", "."]), ids(["def", " f", "(", "x", ")", ":", "\n    ",
           "y", " =", " 1", "\n    ", " return"]), ids(["import", " math", "\n", "y", " =", " 1", "\n", "x", " ="]),
           ids(["x", " =", " 1", "\n", "y", " =", " x", " +"])]


@pytest.mark.parametrize("decode", ["plain", "prompt_lookup"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_run_never_emits_a_token_the_monitor_masked(decode, temperature):
    model = random_model()
    spec = RunSpec(decode=TechniqueSpec(decode), accept=TechniqueSpec("monitor", {"region": "all"}),
                   temperature=temperature, max_new_tokens=6, seed=3)
    fired, departed = 0, 0
    for prompt in PROMPTS:
        events = list(Engine(model, spec, tokenizer=ToyTokenizer()).run(prompt))
        out = [t for e in events for t in e.tokens]
        check = MonitorAcceptance(region="all")
        check.begin(DecodeState(model, None, None, prompt, tokenizer=ToyTokenizer()))
        masks = [check.masked(out[:i]) for i in range(len(out))]
        assert not any(m is not None and bool(m[t]) for m, t in zip(masks, out))
        fired += sum(m is not None for m in masks)
        departed += sum(a != t for e in events for a, t in zip(e.target_argmax, e.tokens))
    assert fired >= len(PROMPTS)  # the monitor had something to say at every prompt's end
    if temperature == 0:  # greedy: the monitor overruled the target's argmax somewhere, and the run says so
        assert departed > 0


def test_labelled_lossy_and_bad_settings_get_plain_errors():
    assert not get("acceptance", "monitor").lossless
    assert not RunSpec.parse("accept=monitor").validated().lossless
    with pytest.raises(SpecError, match="region='code' is not allowed"):
        RunSpec.parse("accept=monitor:region=code").validated()
    with pytest.raises(SpecError, match="no tokenizer"):
        list(Engine(random_model(), RunSpec.parse("accept=monitor;max_new_tokens=2")).run([1, 2, 3]))
