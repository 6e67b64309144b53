"""Worker of test_config_use.py: which documented config keys a real run reads with the
user's value (tests/train/config_reads.py), during two ``aepo train`` steps (vLLM rollouts,
DeepSpeed, the fused loss, weight sync, a checkpoint) and then one ``aepo eval`` on a few
questions. Writes {"train": [...], "eval": [...]} as JSON.

    python tests/train/config_use_worker.py MODEL_DIR RUN_DIR OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.train.config_reads import ReadTracker

TRACKER = ReadTracker()
TRACKER.install()  # before the trainer binds rollout_config

from aepo import evaluate  # noqa: E402
from aepo.train import config, loop  # noqa: E402


def main() -> None:
    model, run_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    smoke = Path(__file__).resolve().parents[2] / "examples" / "smoke.yaml"
    overrides = [f"model.path={model}", f"run.dir={run_dir}", "run.steps=2", "run.save_every=1",
                 "deepspeed.zero_stage=0", "logging.progress=false", "eval.max_questions=2",
                 "eval.k=2"]  # fmt: skip
    cfg = config.load_config(smoke, overrides)
    TRACKER.track(cfg)
    TRACKER.phase = "train"
    loop.train(cfg)
    TRACKER.phase = "eval"
    evaluate.run(cfg)
    out.write_text(json.dumps({k: sorted(v) for k, v in TRACKER.reads.items()}))


if __name__ == "__main__":
    main()
