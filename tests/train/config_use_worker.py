"""Worker of test_config_use.py: which documented config keys a real run reads.

Every read of a config field is recorded (``section.key``), except reads from the config
module itself (loading, validation, the reference) and from ``dataclasses`` (copies, dumps),
during two ``aepo train`` steps (vLLM rollouts, DeepSpeed, the fused loss, weight sync, a
checkpoint) and then one ``aepo eval`` on a few questions. Writes {"train": [...], "eval":
[...]} as JSON.

    python tests/train/config_use_worker.py MODEL_DIR RUN_DIR OUT.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from aepo import evaluate
from aepo.train import config, loop

IGNORED_FILES = (config.__file__, dataclasses.__file__)


def record_reads(seen: set[str]) -> None:
    """Patch every section dataclass of TrainConfig to add ``section.key`` to ``seen`` on each
    field read from outside the config module and ``dataclasses``."""
    for section in dataclasses.fields(config.TrainConfig):
        cls = config.TrainConfig.__dataclass_fields__[section.name].default_factory
        names = {f.name for f in dataclasses.fields(cls)}
        original = cls.__getattribute__

        def getattribute(self, name, _names=names, _section=section.name, _orig=original):
            if name in _names and sys._getframe(1).f_code.co_filename not in IGNORED_FILES:
                seen.add(f"{_section}.{name}")
            return _orig(self, name)

        cls.__getattribute__ = getattribute


def main() -> None:
    model, run_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    smoke = Path(__file__).resolve().parents[2] / "examples" / "smoke.yaml"
    overrides = [f"model.path={model}", f"run.dir={run_dir}", "run.steps=2", "run.save_every=1",
                 "deepspeed.zero_stage=0", "logging.progress=false", "eval.max_questions=2",
                 "eval.k=2"]  # fmt: skip
    cfg = config.load_config(smoke, overrides)
    train, ev = set(), set()
    record_reads(train)
    loop.train(cfg)
    record_reads(ev)  # now both sets see eval's reads: keep them apart below
    before = set(train)
    evaluate.run(cfg)
    out.write_text(json.dumps({"train": sorted(before), "eval": sorted(ev)}))


if __name__ == "__main__":
    main()
