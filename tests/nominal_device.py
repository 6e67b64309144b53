"""Device-placement rehearsal on a CPU-only torch: tensors that say they live on a GPU.

A CUDA build refuses an op that mixes a GPU tensor with a host tensor of one or more dimensions
(0-dim host tensors pass as scalars), and an indexing op such as ``index_select`` or
``index_add_`` that is given any host tensor. Code that gets this wrong crashes the first time
it meets a GPU, which the CPU suite never shows. This module reproduces those checks without a
GPU:

- :class:`Nominal` is a wrapper tensor subclass over real CPU data whose ``device`` is
  ``gpu:0``: every op runs on the CPU data (forward and backward) and its outputs are wrapped
  again, after the device checks above.
- The device is PrivateUse1 renamed ``gpu``, because a CPU-only torch has no device guard for
  ``cuda`` and autograd aborts the process on the first op it records for a ``cuda`` tensor
  (``FakeTensorMode(device="cuda")`` has the same limit, and no data for ``unique`` or
  ``.item()``). So code that branches on ``is_cuda`` takes its CPU branch here: what this
  rehearses is placement (which tensor is on which device), not CUDA-only code paths.
- :func:`on_gpu` (a dispatch mode) also turns factory calls (``torch.zeros(...,
  device=gpu)``) and ``.to(gpu)`` of host tensors into :class:`Nominal` tensors.

Install once per process (:func:`install`): the rename is process-wide and cannot be undone,
which is harmless for the rest of the suite (nothing else uses PrivateUse1).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

GPU = "gpu"
aten = torch.ops.aten

# Ops that CUDA runs only with every tensor argument on the device, 0-dim ones included.
STRICT = {
    aten.index_select.default,
    aten.index_add.default,
    aten.index_add_.default,
    aten.index_copy.default,
    aten.index_copy_.default,
    aten.index_fill.int_Tensor,
    aten.index_fill_.int_Tensor,
    aten.gather.default,
    aten.scatter.src,
    aten.scatter_.src,
    aten.scatter_add.default,
    aten.scatter_add_.default,
    aten.scatter_reduce.two,
    aten.scatter_reduce_.two,
    aten.take.default,
    aten.embedding.default,
    aten.embedding_dense_backward.default,
}
# Advanced indexing takes host index tensors (CUDA copies them over); the rest must be on the
# device like any other op.
HOST_INDICES = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
HOST_INDICES.add(aten._index_put_impl_.default)
COPIES = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default}


class _Backend:
    """``torch.gpu``: one device that nothing else may pick as an accelerator."""

    is_initialized = staticmethod(lambda: True)
    is_available = staticmethod(lambda: False)
    current_device = staticmethod(lambda: 0)
    device_count = staticmethod(lambda: 1)
    _is_in_bad_fork = staticmethod(lambda: False)
    manual_seed_all = staticmethod(lambda seed: None)


class _Hooks(torch._C._acc.PrivateUse1Hooks):
    def is_available(self) -> bool:  # torch.accelerator, accelerate, DeepSpeed look here
        return False

    def has_primary_context(self, dev_id) -> bool:
        return True

    def is_built(self) -> bool:
        return True


def install() -> None:
    """Register the ``gpu`` device (PrivateUse1 with a Python device guard); idempotent.

    Must run before the first backward of the process (tests/conftest.py does it): autograd
    sizes its per-device queues once, from the devices registered then."""
    if torch._C._get_privateuse1_backend_name() == GPU:
        return
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    _setup_privateuseone_for_python_backend(rename=GPU, backend_module=_Backend(), hook=_Hooks())


class Nominal(torch.Tensor):
    """CPU data presented as a tensor on ``gpu:0`` (see the module docstring)."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, device: torch.device | str = f"{GPU}:0"):
        assert not isinstance(data, Nominal) and data.device.type == "cpu"
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            device=torch.device(device),
            requires_grad=data.requires_grad,
        )
        out.host = data.detach() if data.requires_grad else data
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    def tolist(self):  # a host sync, as on CUDA (numpy() stays refused, as on CUDA)
        return self.host.tolist()

    def __repr__(self, **kwargs) -> str:
        return f"Nominal({self.host!r}, device={self.device})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return dispatch(func, args, kwargs or {})

    def __tensor_flatten__(self):
        return ["host"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Nominal(inner["host"])


def _is_gpu(device) -> bool:
    return device is not None and torch.device(device).type == GPU


def check_devices(func, args, kwargs) -> bool:
    """Raise as CUDA would for ``func`` on these arguments; True if any is on the GPU."""
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    gpu = [t for t in tensors if isinstance(t, Nominal)]
    if not gpu or func in COPIES:
        return bool(gpu)
    if func in HOST_INDICES:  # the index list may stay on the host
        tensors = [t for t in tree_flatten((args[0], args[2:], kwargs))[0] if torch.is_tensor(t)]
    for t in tensors:
        if isinstance(t, Nominal) or t.device.type != "cpu":
            continue
        if t.dim() > 0 or func in STRICT:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two "
                f"devices, {gpu[0].device} and {t.device}! (rehearsal of {func}: a host "
                f"tensor of shape {tuple(t.shape)} met a GPU tensor)"
            )
    return True


def _host(x):
    return x.host if isinstance(x, Nominal) else x


def _to_gpu(x):
    if isinstance(x, torch.Tensor) and not isinstance(x, Nominal):
        return Nominal(x)
    return x


def dispatch(func, args, kwargs):
    """Run ``func`` on the CPU data after the device checks; wrap outputs that CUDA would
    place on the device."""
    on_gpu_inputs = check_devices(func, args, kwargs)
    target = kwargs.get("device")
    if target is not None:  # a factory or .to(): the device asked for decides
        wants_gpu = _is_gpu(target)
        kwargs = {**kwargs, "device": torch.device("cpu")}
    else:
        wants_gpu = on_gpu_inputs
    out = func(*tree_map(_host, args), **tree_map(_host, kwargs))
    written = _written_argument(func, args, kwargs)
    if written is not None:  # in place (or out=): the result is the argument itself
        return written
    return tree_map(_to_gpu, out) if wants_gpu else out


def _written_argument(func, args, kwargs):
    """For an op that returns one of its arguments written in place (``add_``, ``out=``), that
    argument; None otherwise."""
    returns = func._schema.returns
    if len(returns) != 1 or returns[0].alias_info is None or not returns[0].alias_info.is_write:
        return None
    alias = returns[0].alias_info.before_set
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.before_set == alias:
            return args[i] if i < len(args) else kwargs[arg.name]
    return None


class _Mode(TorchDispatchMode):
    """Factories and ``.to()`` that name the ``gpu`` device give :class:`Nominal` tensors."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if types and any(issubclass(t, Nominal) for t in types):
            return dispatch(func, args, kwargs)
        if _is_gpu(kwargs.get("device")):
            return dispatch(func, args, kwargs)
        return func(*args, **kwargs)


class _Constructors(TorchFunctionMode):
    """``torch.tensor`` / ``as_tensor`` build their data with the dispatcher's Python modes
    excluded, so a ``gpu`` device there is built on the host and wrapped here."""

    CONSTRUCTORS = (torch.tensor, torch.as_tensor, torch.asarray)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.CONSTRUCTORS and _is_gpu(kwargs.get("device")):
            return Nominal(func(*args, **{**kwargs, "device": "cpu"}))
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_gpu():
    """Within: ``torch.zeros(..., device="gpu")``, ``torch.as_tensor(x, device="gpu")`` and
    ``x.to("gpu")`` give GPU tensors."""
    install()
    with _Constructors(), _Mode():
        yield torch.device(f"{GPU}:0")


def to_gpu(tree):
    """Every tensor in ``tree`` as a :class:`Nominal` GPU tensor (grad flags kept)."""
    install()

    def move(t):
        if not isinstance(t, torch.Tensor) or isinstance(t, Nominal):
            return t
        out = Nominal(t.detach())
        return out.requires_grad_() if t.requires_grad else out

    return tree_map(move, tree)


def host(t: torch.Tensor) -> torch.Tensor:
    """The CPU data behind a tensor (itself for a host tensor)."""
    return _host(t)
