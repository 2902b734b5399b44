"""Activation recompute (`train.activation_checkpointing`): whole blocks (`full`) or cheap regions
(`selective`).

**full** — `checkpointed(block, *args)` runs a block under torch's non-reentrant checkpoint: its activations
are freed after the forward and recomputed during the backward.

**selective** — the model marks its cheap, memory-heavy regions with `cheap(fn, *inputs)`: the mHC
coefficient maps + Sinkhorn + stream pre-mix and the stream post-mix, the RMSNorms, the SwiGLU activation
product of every expert, the Engram gate chain, gate scaling and short conv. Inside `selective_forward()`
(the model's training forward) such a region

1. keeps only its inputs for the backward and recomputes its internals there (a reentrant-style autograd
   function: the recompute runs the modules again, so their parameters receive their gradients as usual),
2. and its outputs are *recipes*: when a later op saves one (the matmul after a norm, the down projection
   after the SwiGLU product), the saved-tensor hook keeps `(fn, inputs)` instead of the tensor and
   recomputes it when the backward unpacks it. A view of an output is rebuilt with the same strides.

Matmul outputs, the residual streams between sublayers, the Engram lookups and the logits stay saved;
nothing with a collective (expert all-to-all, sharded-table lookup) is ever recomputed, so a lookup is
never redone. The recomputation is flagged (`recomputing()`), so modules with per-forward state keep the
values of the real forward: the MoE load counts of loss-free balancing are not counted twice, and the
logged gate and load statistics are the forward's.

`saved_tensor_meter()` counts the bytes autograd keeps for the backward, recipes excluded (the activation
benchmark and the planner's validation use it).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

_RECOMPUTING = contextvars.ContextVar("engram_pretrain_recomputing", default=False)
_SELECTIVE: contextvars.ContextVar[_Recipes | None] = contextvars.ContextVar(
    "engram_pretrain_selective", default=None)
_OBSERVER: contextvars.ContextVar[Callable[[Tensor], None] | None] = contextvars.ContextVar(
    "engram_pretrain_saved_observer", default=None)


def recomputing() -> bool:
    """True while activations are being recomputed for the backward."""
    return _RECOMPUTING.get()


@contextlib.contextmanager
def _recompute_flag() -> Iterator[None]:
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def checkpointed(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` with its activations recomputed in the backward (non-reentrant checkpoint)."""
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _recompute_flag()))


# ---------------------------------------------------------------------------------------------- selective

def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


@contextlib.contextmanager
def _replay(state: tuple[str, bool, torch.dtype]) -> Iterator[None]:
    """The autocast state of the forward, and the recompute flag."""
    device_type, enabled, dtype = state
    with torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled), _recompute_flag():
        yield


@dataclass
class _Recipe:
    """How to rebuild output `index` of `fn(*inputs)` (inputs packed: tensors or nested `_Lazy`)."""

    fn: Callable[..., Any]
    inputs: list[Any]
    index: int | None
    state: tuple[str, bool, torch.dtype]
    ref: weakref.ref[Tensor]
    cache: weakref.ref[Tensor] | None = field(default=None)

    def rebuild(self) -> Tensor:
        cached = self.cache() if self.cache is not None else None
        if cached is not None:  # still alive from another saved view of the same output
            return cached
        args = [_unpack(x) for x in self.inputs]
        with torch.no_grad(), _replay(self.state):
            out = self.fn(*args)
        out = out if self.index is None else out[self.index]
        self.cache = weakref.ref(out)
        return out


@dataclass
class _Lazy:
    """A saved tensor kept as a recipe plus the view (size, stride, offset) that was saved."""

    recipe: _Recipe
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def _unpack(packed: Any) -> Any:
    if isinstance(packed, _Lazy):
        base = packed.recipe.rebuild()
        return base.as_strided(packed.size, packed.stride, packed.offset)
    return packed


def _storage_key(t: Tensor) -> int | None:
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return t.untyped_storage().data_ptr()


class _Recipes:
    """The recipes of one selective forward, by the storage of the outputs they rebuild."""

    def __init__(self) -> None:
        self.by_storage: dict[int, _Recipe] = {}

    def register(self, out: Tensor, recipe: _Recipe) -> None:
        key = _storage_key(out)
        if key is not None:
            self.by_storage[key] = recipe

    def pack(self, t: Tensor) -> Any:
        key = _storage_key(t)
        recipe = self.by_storage.get(key) if key is not None else None
        base = recipe.ref() if recipe is not None else None
        if (recipe is not None and base is not None and base.dtype == t.dtype
                and base.untyped_storage().data_ptr() == key):
            return _Lazy(recipe, t.size(), t.stride(), t.storage_offset())
        observer = _OBSERVER.get()
        if observer is not None:
            observer(t)
        return t


@contextlib.contextmanager
def selective_forward() -> Iterator[None]:
    """Within: `cheap` regions keep only their inputs and their outputs are saved as recipes."""
    recipes = _Recipes()
    token = _SELECTIVE.set(recipes)
    try:
        with torch.autograd.graph.saved_tensors_hooks(recipes.pack, _unpack):
            yield
    finally:
        _SELECTIVE.reset(token)


def selective_active() -> bool:
    """True inside `selective_forward()` with grad enabled: `cheap` regions are recomputed."""
    return _SELECTIVE.get() is not None and torch.is_grad_enabled()


class _CheapRegion(torch.autograd.Function):
    """Forward without a graph, inputs saved; backward recomputes `fn` with grad and differentiates it.

    The parameters `fn` reads are inputs of the function too and their gradients are returned, not
    accumulated by a nested backward: a parameter read by two regions (an mHC layer's pre- and post-mix)
    gets one summed gradient in the outer backward, so per-parameter gradient hooks (ZeRO's reduction)
    fire once.
    """

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., Any], state: tuple[str, bool, torch.dtype], n_inputs: int,
                *inputs_and_params: Tensor | None) -> Any:
        inputs = inputs_and_params[:n_inputs]
        ctx.fn, ctx.state, ctx.params = fn, state, inputs_and_params[n_inputs:]
        ctx.save_for_backward(*inputs)
        out = fn(*inputs)
        ctx.tuple_output = isinstance(out, tuple)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        n = len(ctx.saved_tensors)
        needs = ctx.needs_input_grad[3:]
        inputs = [None if x is None else x.detach().requires_grad_(need)
                  for x, need in zip(ctx.saved_tensors, needs[:n], strict=True)]
        with torch.enable_grad(), _replay(ctx.state):
            out = ctx.fn(*inputs)
        outs = out if ctx.tuple_output else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o.requires_grad]
        wrt = [x for x, need in zip([*inputs, *ctx.params], needs, strict=True) if x is not None and need]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                   if pairs and wrt else [None] * len(wrt))
        return (None, None, None, *[next(got) if x is not None and need else None
                                    for x, need in zip([*inputs, *ctx.params], needs, strict=True)])


def _parameters(fn: Callable[..., Any], module: torch.nn.Module | None) -> list[Tensor]:
    owner = module if module is not None else fn if isinstance(fn, torch.nn.Module) else getattr(
        fn, "__self__", None)
    if not isinstance(owner, torch.nn.Module):
        return []
    return [p for p in owner.parameters() if p.requires_grad]


def cheap(fn: Callable[..., Any], *inputs: Tensor | None, module: torch.nn.Module | None = None,
          keep_output: bool = False) -> Any:
    """`fn(*inputs)`; inside `selective_forward()` a recomputed region (see the module docstring).

    The parameters `fn` may read are those of `module`, else of `fn` itself when it is a module or a bound
    method of one; every other tensor it reads that needs a gradient must be passed in `inputs`.
    `keep_output`: the outputs stay saved where later ops save them (the residual streams) instead of
    becoming recipes.
    """
    recipes = _SELECTIVE.get()
    if recipes is None or not torch.is_grad_enabled():
        return fn(*inputs)
    device = next((x.device.type for x in inputs if x is not None), "cpu")
    state = _autocast_state(device)
    out = _CheapRegion.apply(fn, state, len(inputs), *inputs, *_parameters(fn, module))
    if not keep_output:
        packed = [recipes.pack(x) if isinstance(x, Tensor) else x for x in inputs]
        outs = out if isinstance(out, tuple) else (out,)
        for i, o in enumerate(outs):
            index = i if isinstance(out, tuple) else None
            recipes.register(o, _Recipe(fn, packed, index, state, weakref.ref(o)))
    return out


# ------------------------------------------------------------------------------------------------ meter

@dataclass
class SavedTensorMeter:
    """Distinct storages autograd kept for the backward during the metered forward."""

    storages: dict[int, int] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def observe(self, t: Tensor) -> None:
        key = _storage_key(t)
        if key is not None:
            self.storages[key] = t.untyped_storage().nbytes()


@contextlib.contextmanager
def saved_tensor_meter() -> Iterator[SavedTensorMeter]:
    """`with saved_tensor_meter() as m: loss = model(...)` -> `m.nbytes` saved for the backward (each storage
    once; a selective forward reports what it really keeps, its recipes excluded)."""
    meter = SavedTensorMeter()

    def pack(t: Tensor) -> Tensor:
        meter.observe(t)
        return t

    token = _OBSERVER.set(meter.observe)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield meter
    finally:
        _OBSERVER.reset(token)


def measure_saved_activations(model: torch.nn.Module, input_ids: Tensor) -> int:
    """Bytes one training forward of `model` (an `EngramMoEModel`) on `input_ids` keeps for its backward:
    the meter's storages without the parameters, plus the inputs a `full`-recomputed block keeps (torch's
    checkpoint holds them outside the saved-tensor hooks). Runs the backward to free them."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep_inputs(_module: Any, args: tuple[Any, ...]) -> None:
        for x in args:
            if isinstance(x, Tensor):
                kept[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()

    every = getattr(model, "recompute_every", 0)
    full = every and not getattr(model, "selective_recompute", False)
    hooks = [block.register_forward_pre_hook(keep_inputs)
             for i, block in enumerate(model.blocks) if full and i % every == 0]  # type: ignore[union-attr]
    try:
        with saved_tensor_meter() as meter:
            out = model(input_ids, labels=input_ids.roll(-1, 1))
    finally:
        for h in hooks:
            h.remove()
    out.loss.backward()
    storages = {k: v for k, v in meter.storages.items() if k not in params}
    return sum({**storages, **kept}.values())
