"""The kernel seam: every compute operation the model runs, and which backend runs it on which device.

An operation (`OPERATIONS`) has one signature, the torch backend's (`backend_torch.py`, the reference that runs
everywhere). A backend is one module (`backend_c.py`: the C kernels on CPUs; a `backend_triton.py` slot for
CUDA) that defines `NAME`, `supports(operation, device, dtype)` and, per operation it takes, a function of
the reference's signature with an optional `<operation>_fits(*args)` check for the inputs it takes (where it
says no, the reference runs). `kernels(device, dtype)` binds each operation once to the first backend in
`BACKENDS[device type]` that supports it; a model resolves its `Kernels` once per forward, a linear layer its
`LinearKernel` once when it is built, so a call costs one Python call more than the kernel itself.

`WORKBENCH_KERNELS=torch` runs every operation in the reference; `WORKBENCH_KERNELS=c` requires the C kernels
(an error where they cannot run). `WORKBENCH_CPU_KERNELS=0` keeps working: the C kernels then do not run.
Which backend each operation actually ran is recorded per run (`recorded`, `recording`, `backends_used`) and
goes into every result's provenance. docs/kernels.md describes the operations and how to add a backend.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import ModuleType
from typing import Any, NamedTuple

import torch

from workbench.errors import WorkbenchError
from workbench.kernels import backend_torch

OPERATIONS: dict[str, str] = {
    "linear": "x @ W^T (+ bias), W in the model's dtype held in the backend's layout (bf16: packed)",
    "linear_int8": "x @ (codes * scale[row])^T (+ bias), int8 codes per output row",
    "linear_int4": "x @ (scale * code + offset)^T (+ bias), int4 codes, a scale and offset per group of inputs",
    "linear_int8_a8": "linear_int8 with x quantized to int8 per block of 32 inputs (integer dot products)",
    "linear_int4_a8": "linear_int4 with x quantized to int8 per block of 32 inputs (integer dot products)",
    "attention": "one decoding step's query over a layer's keys and values (a dense cache view)",
    "tree_attention": "a few query rows with a mask among them (a draft tree, a short chunk) over the cache",
    "prefill_attention": "many query rows (a prompt), causal or masked, over the cache",
    "rms_norm": "RMSNorm of each row",
    "add_rms_norm": "the residual add and the next RMSNorm: (x + delta, rms_norm(x + delta))",
    "rope": "rotary position embedding of q or k in the half layout",
    "rope_append": "RoPE of the fused q|k|v product's q and k, k and v written into a dense cache's slots",
    "swiglu": "silu(gate) * up of the fused gate|up product",
    "topk": "the k largest values of each row and their indices (k = 1: the greedy choice)",
    "decoder_layers": "consecutive whole decoder layers in one call (their cache slots written in place)",
    "kivi_attention": "one decoding step's query over a KIVI cache layer: its packed codes and full-precision window",
    "mustafar_attention": "one decoding step's query over a Mustafar cache layer: its bitmaps, nonzeros and window",
}
# weight format -> operation; "_a8": the same weights multiplied by int8 activations (`act=int8`)
LINEAR_OPERATIONS = {"bf16": "linear", "int8": "linear_int8", "int4": "linear_int4", "int8_a8": "linear_int8_a8",
                     "int4_a8": "linear_int4_a8"}
# Attention a compressed cache layer answers for a one-token step (`LayerCache.attention_operation`), reading its
# stored form; the model calls them only where a kernel takes them (`Kernels.reads_stored_form`)
LAYER_ATTENTION_OPERATIONS = ("kivi_attention", "mustafar_attention")
SMALL_QUERY = 64  # up to this many new tokens take `attention`/`tree_attention`; more take `prefill_attention`

BACKENDS: dict[str, tuple[str, ...]] = {"cpu": ("c", "torch"), "cuda": ("triton", "torch")}  # preference order
_MODULES = {"c": "workbench.kernels.backend_c", "torch": "workbench.kernels.backend_torch",
            "triton": "workbench.kernels.backend_triton"}  # the Triton slot is filled by adding that module
FORCE_VARIABLE = "WORKBENCH_KERNELS"


class KernelError(WorkbenchError):
    """A backend was asked for that cannot run here, or an unknown one."""


def backend(name: str) -> ModuleType | None:
    """The backend module `name`, or None where it does not exist (an empty slot) or cannot be imported."""
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError:
        return None


def available_backends() -> list[str]:
    """The backends whose module loads and runs on this machine (the C kernels: built and supported here)."""
    names = [name for name in _MODULES if backend(name) is not None]
    return [name for name in names if getattr(backend(name), "available", lambda: True)()]


def _order(device: torch.device) -> tuple[str, ...]:
    """The backends to try for `device`, best first; torch, the reference, always last."""
    forced = os.environ.get(FORCE_VARIABLE, "").strip().lower()
    if not forced:
        return (*(b for b in BACKENDS.get(device.type, ()) if b != "torch"), "torch")
    if forced not in _MODULES:
        raise KernelError(f"{FORCE_VARIABLE}={forced} names no backend; use one of {', '.join(sorted(_MODULES))}")
    module = backend(forced)
    if module is None:
        raise KernelError(f"{FORCE_VARIABLE}={forced}, but that backend's module is not installed")
    if not getattr(module, "available", lambda: True)():
        raise KernelError(f"{FORCE_VARIABLE}={forced}, but that backend cannot run here: {module.unavailable_reason()}")
    return (forced,) if forced == "torch" else (forced, "torch")


def preference(device: torch.device) -> tuple[str, ...]:
    """The backends tried for `device`, best first (WORKBENCH_KERNELS applied), for a layout's own kernels that
    are not one of OPERATIONS (DFloat11's decoder)."""
    return _order(device)


def _choose(operation: str, device: torch.device, dtype: torch.dtype) -> ModuleType | None:
    """The first backend for `device` that supports `operation` in `dtype` (None: none does)."""
    for name in _order(device):
        module = backend(name)
        if module is not None and module.supports(operation, device, dtype):
            return module
    return None


# What ran: a set of (operation, backend) pairs per run, in a context variable so that runs in other threads
# (the app's side-by-side runs) keep their own.
_usage: ContextVar[set[tuple[str, str]] | None] = ContextVar("workbench_kernel_usage", default=None)


def _recorded(operation: str, name: str, fn: Callable) -> Callable:
    key = (operation, name)

    def run(*args):
        used = _usage.get()
        if used is not None:
            used.add(key)
        return fn(*args)

    return run


def _needs_gradients(args: tuple) -> bool:
    """Whether autograd must flow through this call (training: PV-Tuning, fine-tunes): kernels have no backward."""
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _checked(operation: str, name: str, fn: Callable, fits: Callable, reference: Callable) -> Callable:
    """fn where fits(*args) says it takes the inputs, else the reference (and for calls that need gradients:
    decoding runs without them, so its calls pay one flag check); records which ran."""
    key, reference_key = (operation, name), (operation, backend_torch.NAME)

    def run(*args):
        used = _usage.get()
        if fits(*args) and not _needs_gradients(args):
            if used is not None:
                used.add(key)
            return fn(*args)
        if used is not None:
            used.add(reference_key)
        return reference(*args)

    return run


def bind(operation: str, module: ModuleType) -> Callable:
    """`operation` of backend `module`, recording its use, its inputs checked by the module's `<operation>_fits`
    (the reference runs those it does not take, and calls that need gradients)."""
    fn = getattr(module, operation)
    reference = getattr(backend_torch, operation, None)
    if module is backend_torch or reference is None:
        return _recorded(operation, module.NAME, fn)
    return _checked(operation, module.NAME, fn, getattr(module, f"{operation}_fits", _always), reference)


class Kernels:
    """The operations for one device and dtype, each bound once to the backend that runs it (`backends`).

    Call them as the reference's functions: `kernels.rms_norm(x, weight, eps)`. The one-call decoder layers
    are three entries: `fuses(x, cos, signed_sin)` (whether this forward's shared inputs suit them),
    `layer_row(layer, positions, layer_cache, new_mask, keep)` (a layer's row, or None where it must run on
    its own) and `decoder_layers(x, rows, config, cos, signed_sin)`."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.backends: dict[str, str] = {}
        for operation in OPERATIONS:
            if operation in LINEAR_OPERATIONS.values():  # bound per layer (`linear`): the layout is the layer's
                continue
            module = _choose(operation, device, dtype)
            if module is None:  # only the one-call layers: no backend fuses them here, each layer runs alone
                self.fuses = _never
                continue
            self.backends[operation] = module.NAME
            if operation == "decoder_layers":
                self.fuses = module.decoder_layers_fit
                self.layer_row = module.layer_row
            setattr(self, operation, bind(operation, module))
        # the model hands a dense cache's buffers to `rope_append` only where a kernel fuses it (one launch for
        # RoPE and the append); the reference is the model's own separate RoPE and append
        self.fuses_rope_append = self.backends.get("rope_append", backend_torch.NAME) != backend_torch.NAME
        # likewise a compressed layer's own attention: its reference is the model's own path (dequantize the
        # codes, or the layer's `attend`), so only a kernel that reads the stored form is worth the call
        self.reads_stored_form = {op for op in LAYER_ATTENTION_OPERATIONS
                                  if self.backends.get(op, backend_torch.NAME) != backend_torch.NAME}

    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rope: Callable[..., torch.Tensor]
    rope_append: Callable[..., torch.Tensor]
    swiglu: Callable[..., torch.Tensor]
    topk: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    attention: Callable[..., torch.Tensor]
    tree_attention: Callable[..., torch.Tensor]
    prefill_attention: Callable[..., torch.Tensor]
    decoder_layers: Callable[..., torch.Tensor]
    kivi_attention: Callable[..., torch.Tensor]
    mustafar_attention: Callable[..., torch.Tensor]
    fuses: Callable[..., bool]
    layer_row: Callable[..., list[int] | None]


def _never(*args: Any) -> bool:
    return False


_resolved: dict[tuple[str, torch.dtype], Kernels] = {}


def kernels(device: torch.device, dtype: torch.dtype) -> Kernels:
    """The operations bound for `device` and `dtype` (resolved on first use, then kept; `reset` forgets)."""
    key = (device.type, dtype)
    found = _resolved.get(key)
    if found is None:
        found = _resolved[key] = Kernels(device, dtype)
    return found


def reset() -> None:
    """Forget every resolution (after changing WORKBENCH_KERNELS in a running process, as tests do)."""
    _resolved.clear()


class LinearKernel(NamedTuple):
    """How one linear layer's product runs: `backend`'s module (whose `pack_*` and `unpack_*` helpers give its
    weight layout) and `run`, the bound product taking the weight in that layout."""

    backend: ModuleType
    run: Callable[..., torch.Tensor]

    @property
    def name(self) -> str:
        return self.backend.NAME

    def __deepcopy__(self, memo: dict) -> LinearKernel:  # stateless: a copied model's layer shares it
        return self


def linear(weight_format: str, device: torch.device, dtype: torch.dtype, out_features: int, in_features: int,
           group: int = 0) -> LinearKernel:
    """The backend for a linear layer's weight of this format (`LINEAR_OPERATIONS`' keys), shape and group, with
    activations in `dtype` on `device`: the first that supports the operation and takes the shape."""
    operation = LINEAR_OPERATIONS[weight_format]
    for name in _order(device):
        module = backend(name)
        if (module is not None and module.supports(operation, device, dtype)
                and getattr(module, "weight_fits", _always)(weight_format, out_features, in_features, group)):
            return LinearKernel(module, _recorded(operation, module.NAME, getattr(module, operation)))
    raise AssertionError("the torch backend takes every linear")  # torch is last in every order


def _always(*args: Any) -> bool:
    return True


def note(operation: str, name: str) -> None:
    """Record that `operation` ran in backend `name` outside a bound function (a layout's own fallback)."""
    used = _usage.get()
    if used is not None:
        used.add((operation, name))


@contextmanager
def recording() -> Iterator[set[tuple[str, str]]]:
    """Record the (operation, backend) pairs that run inside the block (in this thread) into the set yielded."""
    used: set[tuple[str, str]] = set()
    token = _usage.set(used)
    try:
        yield used
    finally:
        _usage.reset(token)
        outer = _usage.get()
        if outer is not None:
            outer.update(used)


def recorded(steps: Iterator, used: set[tuple[str, str]]) -> Iterator:
    """`steps` (a run's generator) with what each step runs recorded into `used`: set around each step only, so
    runs interleaved in one thread keep theirs apart; an enclosing `recording` sees them too."""
    iterator = iter(steps)
    while True:
        with recording() as step:
            try:
                item = next(iterator)
            except StopIteration:
                item = _DONE
        used.update(step)
        if item is _DONE:
            return
        yield item


_DONE = object()


def backends_used(used: set[tuple[str, str]]) -> dict[str, str]:
    """{operation: backend} in OPERATIONS order, then the kernels a layout runs itself (`note`: DFloat11's
    decoder); an operation that ran in two backends shows both ("c+torch")."""
    by_operation: dict[str, list[str]] = {}
    for operation, name in used:
        by_operation.setdefault(operation, []).append(name)
    order = [op for op in OPERATIONS if op in by_operation] + sorted(set(by_operation) - set(OPERATIONS))
    return {op: "+".join(sorted(by_operation[op])) for op in order}
