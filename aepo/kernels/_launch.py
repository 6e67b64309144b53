"""The one launch path of every Triton kernel in :mod:`aepo.kernels`, with a recording hook.

Launchers call :func:`launch` with the configuration a GPU gets (constexprs, ``num_warps``);
under ``TRITON_INTERPRET=1`` the ``interpret`` overrides (bigger blocks: the interpreter pays per
block iteration) replace some of them. Inside :func:`record_launches` every launch is also
recorded, and with ``run=False`` only recorded: the compile gate
(:mod:`aepo.kernels.compile_gate`) calls the real public functions on CPU tensors that way and
compiles exactly what they would have launched, for each GPU target, so the variants it checks
come from the launch code itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class Launch:
    """One kernel launch as the launcher issued it (GPU configuration, before overrides)."""

    kernel: Any  # triton JITFunction (InterpretedFunction under TRITON_INTERPRET)
    grid: tuple
    args: tuple  # positional kernel arguments: tensors, ints, floats, None
    kwargs: dict[str, Any] = field(default_factory=dict)  # constexprs and num_warps / num_stages


_RECORDERS: list[tuple[list[Launch], bool]] = []
_EXERCISES: list[Callable[[torch.dtype], None]] = []


@contextlib.contextmanager
def record_launches(run: bool = True) -> Iterator[list[Launch]]:
    """Record every :func:`launch` inside the block into the yielded list.

    ``run=False`` makes launches compile-only: nothing is launched, outputs stay as allocated,
    and the Triton backend is accepted for CPU tensors (see :func:`recording_only`).
    """
    log: list[Launch] = []
    _RECORDERS.append((log, run))
    try:
        yield log
    finally:
        _RECORDERS.pop()


def recording_only() -> bool:
    """True inside ``record_launches(run=False)``."""
    return bool(_RECORDERS) and not _RECORDERS[-1][1]


def launch(kernel, grid: tuple, *args, interpret: dict | None = None, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, through ``torch.library.wrap_triton`` on a real GPU.

    Args:
        kernel: a ``@triton.jit`` function.
        grid: the launch grid.
        interpret: constexpr overrides applied only under ``TRITON_INTERPRET=1``.
        **kwargs: constexprs and compile options, as a GPU launch gets them.
    """
    for log, _ in _RECORDERS:
        log.append(Launch(kernel, tuple(grid), args, dict(kwargs)))
    if recording_only():
        return
    if INTERPRET:
        kernel[grid](*args, **{**kwargs, **(interpret or {})})
    else:
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def gate_exercise(fn: Callable[[torch.dtype], None]) -> Callable[[torch.dtype], None]:
    """Register ``fn(dtype)`` as a compile-gate exercise: it calls public functions on small CPU
    tensors of that dtype so that every launch variant they can produce is recorded. Put one
    next to each public entry point that launches kernels."""
    _EXERCISES.append(fn)
    return fn


def exercises() -> tuple[Callable[[torch.dtype], None], ...]:
    """The registered exercises (of the modules imported so far)."""
    return tuple(_EXERCISES)


def gate_logits(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Small CPU logits covering Triton's argument specialisations: a contiguous [4, 2048]
    block (every size and stride divisible by 16) and a [2, 3, 1001] slice of a [2, 4, 1001]
    tensor (odd sizes, a batch stride: the ``logits[:, :-1]`` case)."""
    return torch.zeros(4, 2048, dtype=dtype), torch.zeros(2, 4, 1001, dtype=dtype)[:, :-1]
