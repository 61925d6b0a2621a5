"""Named points of the forward pass that activation capture and interventions read (trace time).

The model calls `tap(module, point, x)` at each point (`gptjax.nn.inspect` lists them). With no
request active, `tap` returns `x` itself and adds nothing to the program: the model's lowered HLO
is the one without taps (tests/test_inspect.py). `gptjax.nn.inspect.forward_with_capture` makes
a request active while it traces the model (`requesting`); `tap` then applies the request's
interventions at the point and sows the value into the `COLLECTION` collection when it is
captured.

Names: `wte`, `wpe`, `ln_f` at the top; `h_{i}.<point>` inside block i, the point relative to the
block (`resid_pre`, `attn.probs`, `mlp.act`, ...). With `scan_layers` a module runs once for
all its periods: block j of the pattern at period p is layer p * len(attention_pattern) + j, its
captures are stacked over the periods (the scan's collection axis), and an intervention that
differs between layers is chosen by `lax.switch` on the period index the scan feeds in
(`in_period`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax

COLLECTION = "inspect"
KEY_PREFIX = "tap_"  # sown as tap_<point>: GPT's own points share names with its submodules

_REQUEST: contextvars.ContextVar = contextvars.ContextVar("gptjax_taps_request", default=None)
_PERIOD: contextvars.ContextVar = contextvars.ContextVar("gptjax_taps_period", default=None)


@dataclasses.dataclass(frozen=True)
class Request:
    """What one traced forward captures and changes.

    Attributes:
      period: blocks per period of the attention pattern (1 for GPT-2).
      n_periods: n_layer // period.
      scanned: the blocks run as nn.scan over periods (names `h.block_{j}` in the module tree).
      capture: the full names to capture.
      interventions: full name -> function applied to the value at that point.
    """

    period: int
    n_periods: int
    scanned: bool
    capture: frozenset
    interventions: Mapping[str, Callable]

    def scan_collection(self) -> bool:
        """The scan must carry the capture collection (something inside a block is captured)."""
        return self.scanned and any(n.startswith("h_") for n in self.capture)

    def scan_period_index(self) -> bool:
        """The scan must feed its period index in (an intervention inside a block)."""
        return self.scanned and any(n.startswith("h_") for n in self.interventions)


def active() -> Optional[Request]:
    """The request being traced, or None (the plain forward)."""
    return _REQUEST.get()


@contextlib.contextmanager
def requesting(request: Request):
    """Make `request` active while a forward is traced."""
    token = _REQUEST.set(request)
    try:
        yield
    finally:
        _REQUEST.reset(token)


@contextlib.contextmanager
def in_period(period_index: Optional[jax.Array]):
    """Inside one scanned period: `period_index` (traced int32) selects per-layer interventions."""
    if period_index is None:
        yield
        return
    token = _PERIOD.set(period_index)
    try:
        yield
    finally:
        _PERIOD.reset(token)


def _names(request: Request, module: Any, point: str) -> list[str]:
    """The full names of `point` in `module`: one, or one per period of a scanned block."""
    path = tuple(module.path)
    if not path:
        return [point]
    rest = ".".join(path[2:] if path[0] == "h" else path[1:])
    suffix = f"{rest}.{point}" if rest else point
    if path[0] != "h":
        return [f"{path[0]}.{suffix}"]
    j = int(path[1].rsplit("_", 1)[1])  # h.block_{j}
    return [f"h_{p * request.period + j}.{suffix}" for p in range(request.n_periods)]


def wants(module: Any, point: str) -> bool:
    """Whether the active request captures or changes `point` of `module` (any of its layers)."""
    request = _REQUEST.get()
    if request is None:
        return False
    return any(n in request.capture or n in request.interventions
               for n in _names(request, module, point))


def tap(module: Any, point: str, x: Any) -> Any:
    """The value at `point` of `module` as the forward continues with it.

    No request active: `x` itself. Otherwise the request's intervention at this point (if any) is
    applied, and the result is sown into COLLECTION when captured.
    """
    request = _REQUEST.get()
    if request is None:
        return x
    names = _names(request, module, point)
    fns = [request.interventions.get(n) for n in names]
    if any(f is not None for f in fns):
        branches = [_identity if f is None else _checked(f, n) for f, n in zip(fns, names)]
        if len(branches) == 1:
            x = branches[0](x)
        else:
            x = jax.lax.switch(_PERIOD.get(), branches, x)
    if any(n in request.capture for n in names):
        module.sow(COLLECTION, KEY_PREFIX + point, x)
    return x


def _identity(x):
    return x


def _checked(fn: Callable, name: str) -> Callable:
    def apply(x):
        y = fn(x)
        if getattr(y, "shape", None) != x.shape or getattr(y, "dtype", None) != x.dtype:
            raise ValueError(f"the intervention at {name!r} returned "
                             f"{getattr(y, 'shape', type(y))} {getattr(y, 'dtype', '')}; "
                             f"it must keep the activation's shape {x.shape} and dtype {x.dtype}")
        return y
    return apply
