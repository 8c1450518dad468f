"""Record the operations that make the host wait for a GPU, on any device (CPU included).

On a GPU these block the Python thread until the device has caught up with its queue: reading a value
(`.item()`, `int(t)`, `float(t)`, `bool(t)`, `.tolist()`: `aten._local_scalar_dense` in the dispatcher)
and the operations whose output SIZE depends on the data (`nonzero`, `masked_select`, indexing or
index-assigning with a boolean mask, `unique`, `repeat_interleave` without `output_size`). On the CPU they
cost nothing, so the test records them where they are called and a CPU run proves a GPU run has none.

    with HostSyncRecorder() as syncs:
        step_forward_backward(...)
    syncs.events  # {(op, "megatron_lcl/losses/lcl.py:step_counts"), ...}: op and the caller in our code

`.tolist()` of a CPU tensor reads host memory and never reaches the dispatcher, so a `TorchFunctionMode`
records the value-reading Tensor methods as well.
"""

import inspect
import os
from typing import Set, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Output size or a returned value depends on the data: the host waits for the device.
SYNC_OPS = {aten._local_scalar_dense.default: "read a value", aten.nonzero.default: "nonzero",
            aten.masked_select.default: "masked_select", aten.masked_scatter.default: "masked_scatter",
            aten._unique2.default: "unique", aten.unique_consecutive.default: "unique",
            aten.unique_dim.default: "unique", aten.is_nonzero.default: "read a value",
            aten.equal.default: "read a value"}
VALUE_METHODS = {torch.Tensor.tolist: "tolist", torch.Tensor.item: "item", torch.Tensor.__bool__: "bool",
                 torch.Tensor.__int__: "int", torch.Tensor.__float__: "float", torch.Tensor.__index__: "index"}
SOURCES = (os.sep + "megatron_lcl" + os.sep, os.sep + "megatron" + os.sep + "core" + os.sep)


def _caller() -> str:
    """`path:function` of the innermost frame in megatron_lcl or megatron-core (the call site)."""
    for frame in inspect.stack(context=0)[2:]:
        if frame.function in ("__torch_function__", "__torch_dispatch__"):  # a mode (the CPU runtime's)
            continue
        if frame.filename != __file__ and any(s in frame.filename for s in SOURCES):
            marker = next(s for s in SOURCES if s in frame.filename)
            path = frame.filename[frame.filename.index(marker) + 1:]
            return f"{path}:{frame.function}"
    return "<outside the package>"


def _sync_op(func, args, kwargs) -> str:
    """The kind of host sync `func(*args, **kwargs)` is, or '' when it is none."""
    if func in SYNC_OPS:
        return SYNC_OPS[func]
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        masks = [i for i in indices if i is not None and i.dtype in (torch.bool, torch.uint8)]
        if masks and not (func != aten.index.Tensor and _is_masked_fill(indices, masks, args[2])):
            return "boolean-mask index"
    if func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor):
        if kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None):
            return "repeat_interleave without output_size"
    return ""


def _is_masked_fill(indices, masks, value) -> bool:
    """`x[mask] = scalar`: ATen's index_put runs it as `masked_fill_` (no nonzero, no sync) when the only
    index tensor is one mask and the value a single element on the CPU (a Python scalar; on this CPU run
    every tensor is a CPU one, so a one-element device value would be missed)."""
    return len(masks) == 1 and all(i is None or i is masks[0] for i in indices) and value.numel() == 1


class _Dispatch(TorchDispatchMode):
    def __init__(self, events: Set[Tuple[str, str]]):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _sync_op(func, args, kwargs)
        if kind:
            self.events.add((kind, _caller()))
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, events: Set[Tuple[str, str]]):
        super().__init__()
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in VALUE_METHODS:
            self.events.add((VALUE_METHODS[func], _caller()))
        return func(*args, **(kwargs or {}))


class HostSyncRecorder:
    """Context manager; `events`: the set of (kind, caller) seen inside it."""

    def __init__(self):
        self.events: Set[Tuple[str, str]] = set()
        self._modes = (_Function(self.events), _Dispatch(self.events))

    def __enter__(self) -> "HostSyncRecorder":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False
