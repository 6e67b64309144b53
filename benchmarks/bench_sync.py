"""Weight sync (trainer -> colocated vLLM) on 2 gloo ranks under ZeRO-3: peak extra host memory
and wall time of one sync, per rank, for three ways of handing the weights over, and vLLM's
own share.

- ``list``: the former code. Every bucket gathered and cloned as fp32
  (``p.detach().float().clone()``), the clones listed, the list handed to vLLM: a full fp32
  copy of the model per rank, then vLLM's reload.
- ``stream``: ``Trainer.sync_weights``. ``PolicyEngine.gathered_parameters`` streams the
  gathered tensors, model dtype, no copy, into vLLM's loader; a bucket lives while the loader
  reads it.
- ``stream-clone``: the alternative to no copy. Each bucket cloned inside its
  ``GatheredParameters`` context, released, and the clones streamed.
- ``reload-only``: the floor. The fp32 copies of ``list`` made before the measured region,
  then only vLLM's reload of them: what vLLM itself allocates while loading.

Peak extra memory: the VmHWM above VmRSS just before the sync (/proc/self/clear_refs reset),
after a warm-up sync, ``gc.collect()`` and ``malloc_trim(0)``. Each mode runs under glibc's
default allocator settings (what a run sees; its dynamic mmap threshold leaves freed blocks of
up to 32 MiB in the heap, so fragmentation adds to the high-water mark) and with
``MALLOC_MMAP_THRESHOLD_=131072`` (every large block mmapped and returned when freed: the
high-water mark is live memory). One fresh torchrun launch per mode and allocator. Results go to
benchmarks/results/sync_cpu.{md,json} with host, versions and date.

    python benchmarks/bench_sync.py                      # driver: every mode, writes results
    torchrun --nproc_per_node 2 benchmarks/bench_sync.py --worker --mode stream --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_kernels import _rss_kib, device_name

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
MODES = ("list", "stream", "stream-clone", "reload-only")
ALLOCATORS = {"glibc": {}, "mmap128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
TEXTS = [
    f"the {a} of {b} is {c} and {d}"
    for a in "uvwxyz"
    for b in "abcdef"
    for c in "pqr"
    for d in "st"
]


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _fp32_copies(trainer) -> list[tuple[str, torch.Tensor]]:
    """The former ``gathered_parameters``: every bucket gathered and cloned as fp32, listed."""
    import deepspeed

    weights = []
    for bucket in trainer.policy._buckets():
        with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
            weights += [(name, p.detach().float().clone()) for name, p in bucket]
    return weights


def _reload(engine, weights) -> None:
    """The former ``VLLMEngine.update_weights``: a list in, reload, tied-head refresh, reset."""
    from aepo.rollout.engines.vllm import _refresh_tied_lm_head

    weights = [(name, t.detach()) for name, t in weights]
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    engine.llm.collective_rpc(_refresh_tied_lm_head)
    engine.llm.reset_prefix_cache()


def _bucket_clones(trainer):
    """Streamed, but each bucket cloned inside its gather context and released before use."""
    import deepspeed

    for bucket in trainer.policy._buckets():
        with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
            copies = [(name, p.detach().clone()) for name, p in bucket]
        copies.reverse()
        while copies:  # each clone dropped as soon as the loader is done with it
            yield copies.pop()


def prepare(mode: str, trainer):
    """The measured call of ``mode``; what it sets up first (``reload-only``'s copies) is not
    measured."""
    if mode == "list":
        return lambda: _reload(trainer.engine, _fp32_copies(trainer))
    if mode == "stream":
        return trainer.sync_weights
    if mode == "stream-clone":
        return lambda: trainer.engine.update_weights(_bucket_clones(trainer))
    copies = _fp32_copies(trainer)
    return lambda: _reload(trainer.engine, copies)


def build(model_dir: Path, args) -> None:
    """Rank 0: the benchmark's Llama (random init, fp32) and its tokenizer, as an HF folder."""
    from aepo.models import build_model, save, train_tokenizer

    tok = train_tokenizer(TEXTS, vocab_size=args.vocab)
    model = build_model(tok, hidden=args.hidden, layers=args.layers, heads=args.heads)
    save(model, tok, model_dir)


def make_trainer(model_dir: Path, bucket_mb: int):
    """A Trainer with only what a sync and its check need: policy (ZeRO-3) and vLLM engine."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from aepo.train.config import load_config
    from aepo.train.engine import PolicyEngine
    from aepo.train.loop import Trainer
    from aepo.train.rollout import make_engine

    overrides = ["deepspeed.zero_stage=3", f"deepspeed.sync_bucket_mb={bucket_mb}"]
    cfg = load_config(None, [*overrides, "optim.lr=0.001", "logging.sync_check_tokens=8"])
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.rank, trainer.world = cfg, dist.get_rank(), dist.get_world_size()
    trainer.tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer.policy = PolicyEngine(cfg, str(model_dir), grad_accum=1)
    trainer.engine = make_engine(cfg, str(model_dir), trainer.world, trainer.tokenizer)
    return trainer


def optimizer_step(trainer, ids: list[int]) -> None:
    """One AdamW step on a next-token loss, so that the measured sync has new weights to move."""
    x = torch.tensor([ids])
    logits, _ = trainer.policy.logits(x, torch.ones_like(x))
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), x[0, 1:])
    trainer.policy.backward(loss)
    trainer.policy.step()


def measure(sync) -> dict:
    """Peak extra RSS (MiB) above the level just before one sync, and its wall time (s)."""
    import torch.distributed as dist

    gc.collect()
    _malloc_trim()
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    sync()
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM") - base
    dist.barrier()
    return {"peak_extra_mib": peak / 1024, "seconds": seconds, "rss_before_mib": base / 1024}


def worker(args) -> None:
    import torch.distributed as dist

    from aepo.train.engine import init_distributed

    rank, world = init_distributed()
    model_dir = Path(args.model_dir)
    if rank == 0 and not (model_dir / "config.json").is_file():
        build(model_dir, args)
    dist.barrier()
    trainer = make_trainer(model_dir, args.bucket_mb)
    ids = trainer.tokenizer.encode(TEXTS[0])
    prepare(args.mode, trainer)()  # warm-up: vLLM's first reload records layerwise metadata
    runs = []
    for step in range(args.repeats):
        optimizer_step(trainer, ids)
        sync = prepare(args.mode, trainer)
        runs.append(measure(sync) | {"logprob_diff": trainer.check_sync(ids, step)})
        del sync
    module = trainer.policy.engine.module
    numel = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters())
    row = {
        "rank": rank,
        "peak_extra_mib": max(r["peak_extra_mib"] for r in runs),
        "seconds": statistics.median(r["seconds"] for r in runs),
        "rss_before_mib": runs[-1]["rss_before_mib"],
        "logprob_diff": max(r["logprob_diff"] for r in runs),
        "runs": runs,
    }
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
        meta = {"params": numel, "vocab": module.config.vocab_size, "dtype": dtype, "world": world}
        Path(args.json).write_text(json.dumps({"mode": args.mode, **meta, "ranks": rows}))
    dist.barrier()


def launch(mode: str, allocator: str, model_dir: Path, args, out: Path) -> dict:
    """One fresh 2-rank torchrun of :func:`worker` for ``mode``; its JSON report."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.update(ALLOCATORS[allocator])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__]
    cmd += ["--worker", "--mode", mode, "--json", str(out), "--model-dir", str(model_dir)]
    cmd += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in _MODEL_ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{mode}, {allocator}: torchrun failed\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


_MODEL_ARGS = ("hidden", "layers", "heads", "vocab", "bucket_mb", "repeats")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help="run as one torchrun rank")
    p.add_argument("--mode", choices=MODES, default="stream")
    p.add_argument("--json", default="sync.json", help="worker: rank 0 writes its report here")
    p.add_argument("--model-dir", default=None, help="HF folder (built there when missing)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--allocators", nargs="+", choices=ALLOCATORS, default=list(ALLOCATORS))
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--bucket-mb", type=int, default=64, help="deepspeed.sync_bucket_mb")
    p.add_argument("--repeats", type=int, default=2, help="measured syncs per launch")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir or Path(tmp) / "model")
        results = {
            a: {m: launch(m, a, model_dir, args, Path(tmp) / f"{m}.json") for m in args.modes}
            for a in args.allocators
        }
    report = {
        "config": {k: getattr(args, k) for k in _MODEL_ARGS},
        "results": results,
        "env": _env(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sync_cpu.json").write_text(json.dumps(report, indent=1) + "\n")
    text = _render(report)
    (args.out / "sync_cpu.md").write_text(text)
    print(text)


def _env() -> dict:
    import deepspeed
    import vllm

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name("cpu"),
        "cpus": os.cpu_count(),
        "loadavg_1min_at_start": os.getloadavg()[0],  # a shared host makes times noisy
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "vllm": vllm.__version__,
    }


def _render(report: dict) -> str:
    c, results = report["config"], report["results"]
    first = next(iter(next(iter(results.values())).values()))
    model_mib = first["params"] * 4 / 2**20
    lines = [
        f"# Weight sync, trainer -> vLLM: 2 gloo ranks, ZeRO-3, on {report['env']['device']}",
        "",
        f"Llama hidden={c['hidden']} layers={c['layers']} heads={c['heads']} "
        f"vocab={first['vocab']}: {first['params'] / 1e6:.1f} M parameters, {first['dtype']} "
        f"({model_mib:.0f} MiB); bucket (deepspeed.sync_bucket_mb) {c['bucket_mb']} MiB; "
        f"{c['repeats']} measured syncs per launch after a warm-up, each after an optimizer "
        "step and followed by the trainer's log-prob check (Trainer.check_sync). Peak extra: "
        "VmHWM above VmRSS just before the sync, the largest over the syncs; time: median. "
        "Modes and allocators: see benchmarks/bench_sync.py.",
        "",
        "`list` is the former sync (before), `stream` the current `Trainer.sync_weights` "
        "(after), `stream-clone` the per-bucket-clone alternative, `reload-only` what vLLM's "
        "reload itself allocates. `mmap128k` rows are live memory; `glibc` rows add the "
        "heap fragmentation a default run sees.",
        "",
        "| allocator | mode | rank | peak extra MiB | sync s | RSS before MiB | log-prob diff |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for allocator, modes in results.items():
        for mode, r in modes.items():
            for row in r["ranks"]:
                lines.append(
                    f"| {allocator} | {mode} | {row['rank']} | {row['peak_extra_mib']:.0f} "
                    f"| {row['seconds']:.2f} | {row['rss_before_mib']:.0f} "
                    f"| {row['logprob_diff']:.2g} |"
                )
    lines += ["", "```", json.dumps(report["env"], indent=1), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
