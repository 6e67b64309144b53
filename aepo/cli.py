"""The ``aepo`` command.

aepo train CONFIG.yaml [section.key=value ...]   # one process, or each rank of torchrun
aepo eval CONFIG.yaml [--model DIR] [--out DIR] [section.key=value ...]
aepo plot RUN_DIR [--out DIR]                     # PNG curves of a run
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="aepo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a policy with AEPO (or a baseline objective)")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.k=8")
    ev = sub.add_parser("eval", help="evaluate a model on the task's eval split")
    ev.add_argument("config", help="YAML config file (the task, rollout and eval sections)")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.k=8")
    ev.add_argument("--model", help="HF model folder (default: RUN_DIR/final_model)")
    ev.add_argument("--out", help="where eval.json / eval.jsonl go (default: run.dir)")
    sub.add_parser("plot", help="write PNG curves of a run", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "plot":
        from aepo.train.plot import main as plot_main

        return plot_main(argv[1:]) or 0
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    from aepo.tasks.qa_data import DataError
    from aepo.train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        return _run(args, cfg)
    except ConfigError as exc:
        parser.exit(2, f"aepo {args.command}: config error: {exc}\n")
    except DataError as exc:
        parser.exit(2, f"aepo {args.command}: data error: {exc}\n")


def _run(args, cfg) -> int:
    if args.command == "eval":
        from aepo.evaluate import run as run_eval

        path = run_eval(cfg, args.model, args.out)
        print(f"eval written: {path} and {path.with_suffix('.jsonl')}")
        return 0
    from aepo.train.loop import train as run_training

    run_dir = run_training(cfg)
    if run_dir is not None:  # None: stopped by a signal, the checkpoint line already printed
        print(f"run finished: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
