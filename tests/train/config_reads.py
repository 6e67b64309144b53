"""Which config keys a run reads *with the value the user set*.

A key counts as read when code outside the config module reads that field from the run's own
config objects, or from a copy that carried the value over: ``dataclasses.replace`` copies
keep every field they do not change (a changed field is the overwrite that made a key do
nothing, so reading it on the copy does not count), and the rollout's dataclasses built by
:func:`aepo.train.rollout.rollout_config` carry the ``rollout.*`` fields of the same name and
``run.seed``. Reads made while copying (the config module, ``dataclasses``,
``rollout_config``) do not count. Used by config_use_worker.py; tested in test_config_use.py.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

from aepo.rollout.branching import BranchConfig
from aepo.rollout.engines.base import SamplingConfig
from aepo.rollout.tree import RolloutConfig
from aepo.train import config
from aepo.train import rollout as train_rollout

COPYING_FILES = (config.__file__, dataclasses.__file__, __file__)
COPYING_FUNCTIONS = ("_fields_of", "rollout_config")
COMPREHENSIONS = ("<dictcomp>", "<listcomp>", "<setcomp>", "<genexpr>")
DERIVED = (RolloutConfig, BranchConfig, SamplingConfig)


class ReadTracker:
    """Records ``section.key`` for each read of a tracked field into :attr:`phase`'s set.

    ``install()`` patches the config section classes (and the rollout dataclasses) once;
    ``track(cfg)`` marks a loaded :class:`~aepo.train.config.TrainConfig`'s sections.
    """

    def __init__(self) -> None:
        self.reads: dict[str, set[str]] = {}
        self.phase = "default"
        self._keys: dict[int, tuple[object, dict[str, str]]] = {}  # id -> (obj, field -> key)

    def track(self, cfg: config.TrainConfig) -> None:
        for section in dataclasses.fields(cfg):
            obj = getattr(cfg, section.name)
            self._mark(obj, {f.name: f"{section.name}.{f.name}" for f in dataclasses.fields(obj)})

    def keys_of(self, obj) -> dict[str, str]:
        entry = self._keys.get(id(obj))
        return entry[1] if entry is not None and entry[0] is obj else {}

    def _mark(self, obj, keys: dict[str, str]) -> None:
        if keys:
            self._keys[id(obj)] = (obj, keys)  # the reference keeps the id from being reused

    def _record(self, obj, name: str) -> None:
        key = self.keys_of(obj).get(name)
        if key is None:
            return
        frame = sys._getframe(2)
        while frame.f_code.co_name in COMPREHENSIONS:  # their own frame before Python 3.12
            frame = frame.f_back
        code = frame.f_code
        if code.co_filename in COPYING_FILES or code.co_name in COPYING_FUNCTIONS:
            return
        self.reads.setdefault(self.phase, set()).add(key)

    def install(self) -> Callable[[], None]:
        """Patch the classes, ``dataclasses.replace`` and ``rollout_config``; returns undo."""
        sections = [f.default_factory for f in dataclasses.fields(config.TrainConfig)]
        classes = [*sections, *DERIVED]
        saved = [(cls, "__getattribute__", cls.__getattribute__) for cls in classes]
        saved += [(dataclasses, "replace", dataclasses.replace)]
        saved += [(train_rollout, "rollout_config", train_rollout.rollout_config)]
        for cls in classes:
            cls.__getattribute__ = self._getattribute(cls.__getattribute__)
        dataclasses.replace = self._replace(dataclasses.replace)
        train_rollout.rollout_config = self._rollout_config(train_rollout.rollout_config)

        def undo() -> None:
            for owner, name, value in saved:
                setattr(owner, name, value)

        return undo

    def _getattribute(self, original):
        def getattribute(obj, name):
            if not name.startswith("__"):
                self._record(obj, name)
            return original(obj, name)

        return getattribute

    def _replace(self, original):
        def replace(obj, /, **changes):
            new = original(obj, **changes)
            self._mark(new, {f: k for f, k in self.keys_of(obj).items() if f not in changes})
            return new

        return replace

    def _rollout_config(self, original):
        def rollout_config(cfg, protocol=None):
            out = original(cfg, protocol)
            section = self.keys_of(cfg.rollout)
            for obj in (out, out.branch, out.sampling):
                fields = {f.name for f in dataclasses.fields(obj)}
                self._mark(obj, {f: k for f, k in section.items() if f in fields})
            self.keys_of(out)["seed"] = "run.seed"
            return out

        return rollout_config
