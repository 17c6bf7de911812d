"""A stall detector: the operations that would make the host wait for a GPU, counted on the CPU.

``HostStalls`` is a ``TorchDispatchMode`` that sees every aten operation run inside it and records
those that need a device value on the host:

- a device scalar read (``.item()``, ``bool()``, ``int()``, ``float()`` of a tensor, a tensor used as
  a Python number): ``aten._local_scalar_dense``; ``torch.equal``, whose Python bool is read from the
  device (``torch.cov`` calls it);
- a tensor built from Python data (``torch.tensor([...])``): ``aten.lift_fresh``, a pageable
  host-to-device copy on a GPU, which waits for the stream;
- an output whose shape depends on the data (``nonzero``, ``masked_select``, ``unique``, indexing with a
  boolean mask, ``repeat_interleave`` with tensor repeats): the host reads the size before allocating.

Each is listed with where it came from (the innermost frame outside torch). ``Exemption``s name the
host work that is meant to be there, each with why; a stall they match is counted apart, never hidden.
On a GPU, ``tests/unit/test_cuda.py`` checks the same with CUDA's own sync debug mode.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

SCALAR_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
FROM_PYTHON = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
DATA_DEPENDENT = {
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
    aten.repeat_interleave.Tensor,
    aten.argwhere.default,
}
BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}

TORCH_DIR = os.path.dirname(torch.__file__)
# the frames that call a dispatch mode, which say nothing of where the operation came from
MACHINERY = {
    os.path.join(TORCH_DIR, *p)
    for p in (("_compile.py",), ("_dynamo", "eval_frame.py"), ("utils", "_python_dispatch.py"))
}


@dataclasses.dataclass(frozen=True)
class Site:
    """Where a stall came from: the innermost frame outside torch, and the torch frame it called."""

    file: str
    line: int
    function: str
    code: str
    torch_function: str  # the innermost torch Python function on the stack ("" when none)

    def __str__(self) -> str:
        inner = f" (in torch's {self.torch_function})" if self.torch_function else ""
        return f"{os.path.relpath(self.file)}:{self.line} {self.function}: {self.code}{inner}"


@dataclasses.dataclass(frozen=True)
class Stall:
    kind: str  # "scalar read", "from Python data", "data-dependent shape"
    op: str
    site: Site

    def __str__(self) -> str:
        return f"{self.kind} {self.op} at {self.site}"


@dataclasses.dataclass(frozen=True)
class Exemption:
    """Host work meant to be there: ``matches(stall)`` says which, ``why`` says why it costs a GPU nothing."""

    name: str
    why: str
    matches: Callable[[Stall], bool]


def _site() -> Site:
    frames = traceback.extract_stack()[:-3]  # less this module's own frames
    torch_function = ""
    for frame in reversed(frames):
        if frame.filename == __file__ or frame.filename in MACHINERY:
            continue
        if frame.filename.startswith(TORCH_DIR):
            torch_function = torch_function or frame.name
            continue
        return Site(frame.filename, frame.lineno or 0, frame.name, (frame.line or "").strip(), torch_function)
    return Site("?", 0, "?", "", torch_function)


def _kind(func, args) -> str | None:
    if func in SCALAR_READS:
        return "scalar read"
    if func in FROM_PYTHON:
        return "from Python data"
    if func in DATA_DEPENDENT:
        return "data-dependent shape"
    if func in BOOL_INDEXED:
        indices = args[1] if len(args) > 1 else []
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "data-dependent shape"
    return None


class HostStalls(TorchDispatchMode):
    """Records every host stall run inside it: ``stalls`` (not exempt) and ``exempt`` (name -> count)."""

    def __init__(self, exemptions: list[Exemption] = ()):
        super().__init__()
        self.exemptions = list(exemptions)
        self.stalls: list[Stall] = []
        self.exempt: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = _kind(func, args)
        if kind is not None:
            stall = Stall(kind, str(func.overloadpacket.__name__), _site())
            name = next((e.name for e in self.exemptions if e.matches(stall)), None)
            if name is None:
                self.stalls.append(stall)
            else:
                self.exempt[name] = self.exempt.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def report(self) -> str:
        return "\n".join(str(s) for s in self.stalls) or "none"


def in_torch_function(name: str) -> Callable[[Stall], bool]:
    """Matches stalls made inside torch's Python function ``name``."""
    return lambda stall: stall.site.torch_function == name


def at_code(fragment: str) -> Callable[[Stall], bool]:
    """Matches stalls made by a source line holding ``fragment``."""
    return lambda stall: fragment in stall.site.code
