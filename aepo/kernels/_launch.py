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
import functools
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Triton < 3.7's interpreter turns 1-element numpy arrays into ints with int(), a TypeError
# since numpy 2.4 (triton-lang/triton#9172, fixed in 3.7): every interpreted kernel fails.
INTERPRETER_NUMPY_FIX = {"triton": (3, 7), "numpy": (2, 4)}


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
        _check_interpreter()
        kernel[grid](*args, **{**kwargs, **(interpret or {})})
        return
    device = other_device(args)
    with contextlib.nullcontext() if device is None else torch.cuda.device(device):
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def other_device(args) -> torch.device | None:
    """The CUDA device of the first CUDA tensor in ``args`` when it is not the current device
    (None otherwise, and under torch.compile, whose generated code sets the device itself).

    Triton launches on the current device and stream: logits on cuda:1 while cuda:0 is current
    (a model placed with ``.to("cuda:1")``, no ``torch.cuda.set_device``) would otherwise fail
    with "Pointer argument cannot be accessed from Triton", or run on GPU 0 over peer access."""
    if torch.compiler.is_compiling():
        return None
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.is_cuda:
            return arg.device if arg.device.index != torch.cuda.current_device() else None
    return None


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run with these versions ("3.6.0", "2.4.1"), or None."""
    fix = INTERPRETER_NUMPY_FIX
    if _major_minor(triton_version) >= fix["triton"] or _major_minor(numpy_version) < fix["numpy"]:
        return None
    return (
        f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run with numpy "
        f"{numpy_version}: before Triton 3.7 it converts 1-element arrays with int(), a "
        "TypeError since numpy 2.4. Install numpy<2.4 or triton>=3.7"
    )


@functools.cache
def _check_interpreter() -> None:
    import numpy
    import triton

    problem = interpreter_problem(triton.__version__, numpy.__version__)
    if problem:
        raise RuntimeError(problem)


def register_op(name: str, mutates_args: tuple[str, ...], fake: Callable):
    """Decorator: register a launcher as the torch.library op ``name`` ("aepo::...").

    Real Triton: ``triton_op``, which torch.compile traces into (the kernels stay visible to
    Inductor), so the launcher's host code runs on FakeTensors there: shapes and strides only,
    never ``data_ptr()`` or a value read back. Interpreter: an opaque ``custom_op`` with the
    explicit ``fake``, because interpreted kernels cannot run on FakeTensors.
    """

    def wrap(fn):
        if INTERPRET:
            op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
            op.register_fake(fake)
            return op
        return torch.library.triton_op(name, fn, mutates_args=mutates_args)

    return wrap


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
