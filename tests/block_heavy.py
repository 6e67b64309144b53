"""pytest plugin (``-p tests.block_heavy``): makes vLLM, DeepSpeed and Liger-Kernel unimportable,
as on a GPU machine that has none of them, to check what collecting the CUDA tests imports."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

BLOCKED = ("vllm", "deepspeed", "liger_kernel")


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by tests.block_heavy)")
        return None


_find_spec = importlib.util.find_spec


def _absent(name, package=None):
    """``importlib.util.find_spec`` as where the package is not installed: None (what
    transformers' ``is_deepspeed_available`` and the like probe), not an error."""
    if name.split(".")[0] in BLOCKED:
        return None
    return _find_spec(name, package)


sys.meta_path.insert(0, _Block())
importlib.util.find_spec = _absent
