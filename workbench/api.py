"""The Python API: load a model once, run specs on prompts, get Traces (or stream StepEvents).

    from workbench import Workbench
    wb = Workbench()                                  # the embedded SmolLM2-135M
    trace = wb.generate("Why is the sky blue?", "decode=plain;max_new_tokens=32")
    print(trace.text, trace.summary()["tok_per_s"])
"""

from __future__ import annotations

import dataclasses
import gc
import platform
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from workbench.compression.base import apply_compression
from workbench.engine import Engine, StepEvent
from workbench.errors import PromptError, SpecError
from workbench.kernels import dispatch
from workbench.models import LoadedModel, load_model
from workbench.models.packed_linear import can_pack, pack_linears
from workbench.provenance import backends, provenance
from workbench.spec import DEFAULT_MODEL, RunSpec
from workbench.trace import Trace

if TYPE_CHECKING:
    from workbench.store import Recorder

Prompt = str | list[dict[str, str]]  # plain text, or chat messages [{"role": ..., "content": ...}]


def hardware_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _freeze_loaded_objects() -> None:
    """Move every object alive now (the model's, torch's, transformers'...) out of the garbage collector's
    reach. They stay alive as long as the process, yet each full collection walks all of them, a pause that
    lands in a decoding step at random (docs/performance.md). `gc.freeze` acts on the whole process: objects
    frozen are never collected, so a program that frees them later keeps their memory."""
    gc.collect()
    gc.freeze()


class Workbench:
    """Holds loaded models (by name, dtype and device) and runs specs on them.

    With `store` (a `workbench.store.Store` or `StoreThread`), every run is recorded: begun as `running`
    when it starts and finished with its final status (done, failed or interrupted) however it ends.

    With `freeze_gc` (off by default), every model load ends with `gc.freeze()`: the objects alive then are
    never walked by the garbage collector again, which keeps its pauses out of decoding steps but applies to
    the whole process. The CLI, the app and `workbench bench` turn it on; a library user decides.
    """

    def __init__(self, model: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto",
                 store: Recorder | None = None, freeze_gc: bool = False):
        self.default = RunSpec(model=model, dtype=dtype, device=device)
        self.store = store
        self.freeze_gc = freeze_gc
        self._models: dict[tuple[str, str, str, str], LoadedModel] = {}
        self._memory: dict[tuple[str, str, str, str], dict] = {}  # per model: what techniques keep across runs
        self.model(self.default)

    def model(self, spec: RunSpec) -> LoadedModel:
        key = self._key(spec)
        if key not in self._models:
            loaded = load_model(spec.model, spec.dtype, spec.device)
            if spec.compress:  # before packing: transforms read and replace plain nn.Linear layers
                loaded.compression = apply_compression(loaded, spec.compress)
            if can_pack(loaded.dtype, loaded.device):  # the last step: a runtime layout, after any transform
                pack_linears(loaded.model)
            self._models[key] = loaded
            if self.freeze_gc:
                _freeze_loaded_objects()
        return self._models[key]

    def memory(self, spec: RunSpec) -> dict:
        """What techniques keep across runs on `spec`'s model: drafters' tables, cache policies' calibrations."""
        return self._memory.setdefault(self._key(spec), {})

    @staticmethod
    def _key(spec: RunSpec) -> tuple[str, str, str, str]:
        """Models are cached per name, dtype, device and compression chain."""
        return spec.model, spec.dtype, spec.device, "+".join(t.to_string() for t in spec.compress)

    def spec(self, spec: RunSpec | str | None = None, **overrides: Any) -> RunSpec:
        """A validated spec: this workbench's model, dtype and device unless the spec names others."""
        if isinstance(spec, str):
            spec = RunSpec.parse(spec)
            for key in ("model", "dtype", "device"):  # fields the string left at their defaults
                if getattr(spec, key) == getattr(RunSpec, key):
                    setattr(spec, key, getattr(self.default, key))
        elif spec is None:
            spec = RunSpec(model=self.default.model, dtype=self.default.dtype, device=self.default.device)
        spec = dataclasses.replace(spec)  # overrides never change the caller's spec
        for key, value in overrides.items():
            if not hasattr(spec, key):
                raise SpecError(f"unknown spec field {key!r}")
            setattr(spec, key, value)
        return spec.validated()

    def prompt_ids(self, loaded: LoadedModel, prompt: Prompt, chat: bool | None) -> list[int]:
        """Token ids of the prompt; chat messages or `chat=True` go through the model's chat template."""
        text_empty = (not prompt.strip()) if isinstance(prompt, str) else not any(
            m.get("content", "").strip() for m in prompt)
        if text_empty:
            raise PromptError("the prompt is empty; give some text to continue or a question to answer")
        tokenizer = loaded.tokenizer
        if tokenizer is None:  # tiny random test models: the prompt is space-separated token ids
            if not isinstance(prompt, str):
                raise PromptError("this model has no tokenizer, so it takes no chat messages")
            try:
                return [int(t) for t in prompt.split()]
            except ValueError:
                raise PromptError("this model has no tokenizer; give the prompt as space-separated token ids") \
                    from None
        has_template = bool(getattr(tokenizer, "chat_template", None))
        use_chat = has_template if chat is None else chat
        if isinstance(prompt, list) and not use_chat:
            raise PromptError("chat messages need the chat template; leave chat on")
        if use_chat:
            if not has_template:
                raise PromptError(f"model {loaded.name} has no chat template; use --no-chat")
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer(prompt)["input_ids"]

    def stream(self, prompt: Prompt, spec: RunSpec | str | None = None, trace_out: list[Trace] | None = None,
               memory: dict | None = None, **overrides: Any) -> Iterator[StepEvent]:
        """Yield StepEvents as the run goes; the finished Trace is appended to `trace_out` if given.

        `memory`: what techniques keep across runs (token recycling's matrix, calibrations); by default the
        one the model's runs share (`Workbench.memory`). A benchmark gives each technique its own."""
        spec = self.spec(spec, **overrides)
        loaded = self.model(spec)
        ids = self.prompt_ids(loaded, prompt, spec.chat)
        engine = Engine(loaded.model, spec, [] if spec.ignore_eos else loaded.eos_token_ids, loaded.detokenize,
                        memory=self.memory(spec) if memory is None else memory, tokenizer=loaded.tokenizer)
        trace = Trace(spec=spec, prompt=prompt, prompt_ids=ids, model=loaded.name, dtype=str(loaded.dtype),
                      device=str(loaded.device), hardware=hardware_description(loaded.device),
                      weight_bytes=loaded.weight_bytes(),
                      simulated=[r.name for r in loaded.compression if r.simulated]
                      + [p.technique_name for p in engine.policies if p.simulated],
                      warnings=engine.warnings(ids),
                      provenance=provenance(loaded.model, loaded.device, loaded.dtype))
        if trace_out is not None:
            trace_out.append(trace)
        if self.store is not None:
            self.store.begin(trace)
        used: set[tuple[str, str]] = set()  # (operation, backend) pairs the kernel seam ran
        try:
            for event in dispatch.recorded(engine.run(ids), used):
                trace.warm_start = engine.drafter.warm_started
                trace.events.append(event)
                yield event
        except (KeyboardInterrupt, GeneratorExit):
            trace.status = "interrupted"
            raise
        except Exception as err:
            trace.status, trace.error = "failed", f"{type(err).__name__}: {err}"
            raise
        else:
            trace.status = "done"
        finally:
            trace.provenance["backends"] = backends(loaded.model, used)
            if engine.static is not None:  # how the decoding steps ran: static (graphs) or eager, and why
                trace.provenance["graphs"] = engine.static.report()
            if self.store is not None:
                if trace.status == "running":  # ended by something other than an Exception (SystemExit...)
                    trace.status = "interrupted"
                self.store.finish(trace)

    def generate(self, prompt: Prompt, spec: RunSpec | str | None = None,
                 on_event: Callable[[StepEvent], None] | None = None, memory: dict | None = None,
                 **overrides: Any) -> Trace:
        """Run to the end and return the Trace; `on_event` sees each StepEvent as it happens (`memory`: as
        in `stream`)."""
        out: list[Trace] = []
        for event in self.stream(prompt, spec, trace_out=out, memory=memory, **overrides):
            if on_event is not None:
                on_event(event)
        return out[0]
