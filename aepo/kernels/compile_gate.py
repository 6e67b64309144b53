"""Compile gate: every Triton kernel of :mod:`aepo.kernels`, compiled for real GPU targets, no GPU.

Triton's interpreter (how the tests run the kernels on CPU) accepts code the compiler refuses,
so this gate compiles each kernel ahead of time with Triton's own compiler (the wheel ships
``ptxas`` and the AMD linker) for CUDA sm_80 / sm_90 / sm_100 and ROCm gfx942.

What it compiles comes from the launch code itself: the registered exercises
(:func:`aepo.kernels._launch.gate_exercise`) call the real public functions on small CPU
tensors of every supported dtype inside ``record_launches(run=False)``; each recorded launch is
specialised with the target backend's own argument binder (dtypes, 16-divisibility, constexprs,
``num_warps``) exactly as a launch on that GPU would be, and compiled. A ``*_kernel`` function in
``aepo.kernels`` that no exercise launches fails the gate, so new kernels are covered as soon
as they exist. Each compile also reports its resources (registers, spills, shared memory).
:func:`sweep_resources` does the same for the launch configurations that
``benchmarks/sweep_kernels.py`` would time, at the sweep's shapes.

    python -m aepo.kernels.compile_gate [--targets sm_90 gfx942] [--json out.json]

Must run without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import pkgutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import torch
import triton

import aepo.kernels
from aepo.kernels import _launch, _resources

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TARGETS = {
    "sm_80": ("cuda", 80, 32),
    "sm_90": ("cuda", 90, 32),
    "sm_100": ("cuda", 100, 32),
    "gfx942": ("hip", "gfx942", 64),
}
KERNEL_SUFFIX = "_kernel"  # launchable kernels; other @triton.jit functions are helpers


@dataclass
class Variant:
    """One specialisation of a kernel for one target, as its launch would compile it."""

    module: str
    kernel: str
    target: str
    signature: dict  # argument name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # argument name -> value
    attrs: list  # [argument name, [[attribute, value], ...]] (e.g. tt.divisibility 16)
    options: dict  # backend options (num_warps, num_stages, ...)

    def label(self) -> str:
        """kernel [pointer dtypes; constexprs; warps] for messages and the report."""
        ptrs = sorted({t[1:] for t in self.signature.values() if t.startswith("*")})
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel} [{'/'.join(ptrs)}; {consts}; num_warps={self.options['num_warps']}]"

    def divisible_ints(self) -> list[str]:
        """Integer arguments Triton specialised as multiples of 16 (vectorised addressing)."""
        div = {name for name, values in self.attrs if ["tt.divisibility", 16] in values}
        return [n for n, t in self.signature.items() if t[0] in "iu" and n in div]

    def key(self) -> str:
        """Identity for de-duplication: equal keys compile to the same binary."""
        parts = [self.module, self.kernel, self.target, self.signature, repr(self.constexprs)]
        return json.dumps([*parts, self.attrs, self.options], sort_keys=True, default=str)


@dataclass
class Result:
    variant: Variant
    ok: bool
    error: str = ""
    seconds: float = 0.0
    resources: dict = field(default_factory=dict)


def import_kernel_modules(extra: tuple[str, ...] = ()) -> list:
    """Import every module of aepo.kernels (and ``extra`` modules); return them."""
    names = [f"aepo.kernels.{m.name}" for m in pkgutil.iter_modules(aepo.kernels.__path__)]
    return [importlib.import_module(n) for n in (*names, *extra)]


def find_kernels(modules) -> dict[tuple[str, str], object]:
    """(module, name) -> kernel for each ``@triton.jit`` ``*_kernel`` defined in ``modules``
    (a JITFunction; an InterpretedFunction under TRITON_INTERPRET)."""
    found = {}
    for mod in modules:
        for name, obj in vars(mod).items():
            fn = getattr(obj, "fn", None)
            if (
                isinstance(obj, triton.runtime.jit.KernelInterface)
                and name.endswith(KERNEL_SUFFIX)
                and getattr(fn, "__module__", None) == mod.__name__
            ):
                found[(mod.__name__, name)] = obj
    return found


def record(dtypes=DTYPES) -> list[_launch.Launch]:
    """Run every registered exercise for every dtype, compile-only; return the launches."""
    with _launch.record_launches(run=False) as log:
        for exercise in _launch.exercises():
            for dtype in dtypes:
                exercise(dtype)
    return log


def specialize(launch: _launch.Launch, target: str) -> Variant:
    """The variant ``launch`` compiles to on ``target``, from the backend's own binder."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget(*TARGETS[target]))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = _pack(kernel, backend, launch.kwargs, bound, spec, opts)
    names = kernel.arg_names
    return Variant(
        module=kernel.fn.__module__,
        kernel=kernel.fn.__name__,
        target=target,
        signature=dict(signature),
        constexprs={names[path[0]]: value for path, value in constexprs.items()},
        attrs=[[names[path[0]], value] for path, value in attrs.items() if value],
        options={k: v for k, v in options.__dict__.items() if _plain(v)},
    )


def _pack(kernel, backend, kwargs, bound, spec, opts):
    """(options, signature, constexprs, attrs) of a bound launch, as JITFunction.run forms them."""
    if hasattr(kernel, "_pack_args"):  # Triton >= 3.5
        return kernel._pack_args(backend, kwargs, bound, spec, opts)
    from triton._utils import find_paths_if, get_iterable_path  # Triton 3.3 / 3.4: inline in run

    sigvals = [s[0] for s in spec]
    signature = dict(zip([p.name for p in kernel.params], sigvals, strict=True))
    paths = find_paths_if(sigvals, lambda _, val: val == "constexpr")
    constexprs = {path: get_iterable_path(list(bound.values()), path) for path in paths}
    attrvals = [s[1] for s in spec]
    paths = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = {path: backend.parse_attr(get_iterable_path(attrvals, path)) for path in paths}
    return backend.parse_options(kwargs), signature, constexprs, attrs


def _plain(value) -> bool:
    return isinstance(value, (int, float, str, bool, type(None)))


def compile_variant(variant: Variant) -> Result:
    """Compile one variant with Triton's compiler; never raises."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    kernel = getattr(importlib.import_module(variant.module), variant.kernel)
    names = kernel.arg_names
    constexprs = {(names.index(k),): v for k, v in variant.constexprs.items()}
    attrs = {(names.index(k),): v for k, v in variant.attrs}
    try:
        src = ASTSource(kernel, variant.signature, constexprs, attrs)
        target = GPUTarget(*TARGETS[variant.target])
        compiled = triton.compile(src, target=target, options=dict(variant.options))
        resources = _resources.of_compiled(compiled, variant.target, variant.options["num_warps"])
        resources["loop_per_element"] = loop_per_element(variant, resources)
    except Exception as exc:  # the gate reports every compiler failure, of any type
        message = f"{type(exc).__name__}: {exc}".strip()
        return Result(variant, False, message[-4000:], time.perf_counter() - start)
    return Result(variant, True, "", time.perf_counter() - start, resources)


def loop_elements(variant: Variant) -> int | None:
    """Elements one thread handles per main-loop iteration, for kernels whose module names the
    constexpr that sizes the iteration: ``SASS_LOOP_BLOCK = {kernel: "BLOCK_V"}`` (BLOCK_V
    elements per program per iteration, spread over its threads); None for other kernels."""
    block = getattr(importlib.import_module(variant.module), "SASS_LOOP_BLOCK", {})
    if variant.kernel not in block:
        return None
    threads = TARGETS[variant.target][2] * variant.options["num_warps"]
    return max(variant.constexprs[block[variant.kernel]] // threads, 1)


def loop_per_element(variant: Variant, resources: dict) -> float | None:
    """SASS instructions of the main loop per element (:func:`loop_elements`), CUDA only."""
    elements = loop_elements(variant)
    if not elements or not resources.get("loop_instructions"):
        return None
    return resources["loop_instructions"] / elements


def run_gate(targets=tuple(TARGETS), extra_modules=(), jobs: int = 2) -> dict:
    """Record, specialise and compile everything; returns a JSON-ready report.

    The report has ``results`` (one per variant and target), ``unlaunched`` (kernels no
    exercise launched) and ``failures`` (human-readable lines; empty when the gate passes).
    """
    if _launch.INTERPRET:
        raise RuntimeError("the compile gate needs TRITON_INTERPRET unset (it compiles kernels)")
    start = time.perf_counter()
    kernels = find_kernels(import_kernel_modules(tuple(extra_modules)))
    launches = record()
    variants: dict[str, Variant] = {}
    for launch in launches:
        for target in targets:
            variant = specialize(launch, target)
            variants.setdefault(variant.key(), variant)
    launched = {(v.module, v.kernel) for v in variants.values()}
    unlaunched = sorted(f"{m}:{k}" for m, k in kernels if (m, k) not in launched)
    results = _compile_all(list(variants.values()), jobs)
    failures = [f"{u} is never launched by a compile-gate exercise" for u in unlaunched]
    failures += [
        f"{r.variant.module}:{r.variant.label()} does not compile for {r.variant.target}: {r.error}"
        for r in results
        if not r.ok
    ]
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "targets": list(targets),
        "seconds": round(time.perf_counter() - start, 2),
        "unlaunched": unlaunched,
        "failures": failures,
        "results": [_as_json(r) for r in results],
    }


def _as_json(result: Result) -> dict:
    out = asdict(result)
    out["label"], out["divisible"] = result.variant.label(), result.variant.divisible_ints()
    return out


def _compile_all(variants: list[Variant], jobs: int) -> list[Result]:
    if jobs <= 1 or len(variants) < 2:
        return [compile_variant(v) for v in variants]
    # fork: the children inherit the imported kernel modules (including test-only extras).
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        return list(pool.map(compile_variant, variants))


# The shapes benchmarks/sweep_kernels.py times (as make gpu-check runs it): rows, V, H.
SWEEP_SHAPES = {"logits": (16384, 151936, 0)}


@contextlib.contextmanager
def sweep_override(family: str, config: dict, element_size: int):
    """Apply one sweep configuration the way benchmarks/sweep_kernels.py does, then restore.

    ``logits``: ``{"BLOCK_V", "num_warps"}`` into ``logprob_entropy.GPU_CONFIGS[element_size]``
    (the only family: the hidden-state path runs cuBLAS GEMMs and these kernels).
    """
    from aepo.kernels import logprob_entropy as le

    if family == "logits":
        saved = le.GPU_CONFIGS[element_size]
        le.GPU_CONFIGS[element_size] = (config["BLOCK_V"], config["num_warps"])
        try:
            yield
        finally:
            le.GPU_CONFIGS[element_size] = saved
    else:
        raise ValueError(f"unknown kernel family {family!r} (logits)")


def record_sweep(family: str, config: dict, dtype=torch.bfloat16) -> list[_launch.Launch]:
    """The launches one sweep configuration times: forward and backward (both upstream
    gradients) through the same entry points as the sweep, at :data:`SWEEP_SHAPES`, on meta
    tensors (shapes, strides and dtypes without memory; nothing runs)."""
    from aepo.kernels import logprob_entropy as le

    n, vocab, _ = SWEEP_SHAPES[family]
    meta = {"device": "meta"}
    g, m, log_s, ent = (torch.empty(n, **meta) for _ in range(4))  # [N] fp32 each
    labels = torch.empty(n, dtype=torch.int64, **meta)
    with sweep_override(family, config, dtype.itemsize), _launch.record_launches(False) as log:
        logits = torch.empty(n, vocab, dtype=dtype, **meta)
        le.logprobs_entropy_fwd(logits, labels, 1.0, -100, False)
        grad = torch.empty_like(logits)
        le.logprobs_entropy_bwd(logits, labels, m, log_s, ent, g, g, grad, 1.0, -100)
    return log


def sweep_resources(
    family: str, configs: list[dict], target: str = "sm_90", jobs: int = 2
) -> list[dict[str, Result]]:
    """For each sweep configuration, kernel name -> its compile :class:`Result` on ``target``
    (``ok``, ``error``, ``resources``: registers, stack, ...; spills: :func:`compiles_clean`).

    Compiles exactly the variants :func:`record_sweep` records, each distinct one once.
    """
    if _launch.INTERPRET:
        raise RuntimeError("sweep_resources needs TRITON_INTERPRET unset (it compiles kernels)")
    per_config, variants = [], {}
    for config in configs:
        keys: dict[str, str] = {}
        for launch in record_sweep(family, config):
            variant = specialize(launch, target)
            variants.setdefault(variant.key(), variant)
            if keys.setdefault(variant.kernel, variant.key()) != variant.key():
                raise ValueError(f"{config}: two variants of {variant.kernel} in one sweep run")
        per_config.append(keys)
    results = dict(zip(variants, _compile_all(list(variants.values()), jobs), strict=True))
    return [{kernel: results[key] for kernel, key in keys.items()} for keys in per_config]


def compiles_clean(result: Result) -> bool:
    """True when the compile succeeded and spilled nothing (:func:`_resources.spilled`)."""
    return result.ok and _resources.spilled(result.resources) == 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    p.add_argument("--also", nargs="*", default=[], help="extra modules holding kernels")
    p.add_argument("--jobs", type=int, default=2, help="compiler processes")
    p.add_argument("--json", help="write the full report here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run_gate(tuple(args.targets), tuple(args.also), args.jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    n_ok = sum(r["ok"] for r in report["results"])
    print(
        f"compile gate (Triton {report['triton']}): {n_ok}/{len(report['results'])} compiles "
        f"passed for {', '.join(report['targets'])} in {report['seconds']:.1f} s"
    )
    for line in report["failures"]:
        print("FAIL", line)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
