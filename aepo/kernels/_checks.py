"""Input validation shared by every backend: errors name the argument and what was wrong."""

from __future__ import annotations

import math

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_temperature(temperature: float) -> float:
    """Return 1 / temperature after checking it is a positive finite number."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return 1.0 / float(temperature)


def check_logits_labels(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, check_range: bool = True
) -> torch.Tensor:
    """Validate a ([..., V] logits, [...] labels) pair; return the labels as int64.

    The label-range check costs one host sync; it is skipped while torch.compile traces.
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            "logits and labels must be torch.Tensor, got "
            f"{type(logits).__name__} and {type(labels).__name__}"
        )
    _check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dim, got {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    return check_labels(labels, logits, "logits", "vocabulary", vocab, ignore_index, check_range)


def check_hidden_weight(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Validate ([..., H] hidden, [V, H] weight) for the hidden-state path; return weight."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(
            "hidden and weight must be torch.Tensor, got "
            f"{type(hidden).__name__} and {type(weight).__name__}"
        )
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D [V, H] (the lm_head weight), got {tuple(weight.shape)}"
        )
    if weight.numel() == 0:
        raise ValueError(
            f"weight {tuple(weight.shape)} has no elements: a ZeRO-3 partitioned parameter must "
            "be gathered first (deepspeed.zero.GatheredParameters)"
        )
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must end in H = weight.shape[1] = {weight.shape[1]} "
            f"(weight {tuple(weight.shape)} is [V, H])"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight dtypes differ: {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(
            f"hidden and weight must be on the same device, got {hidden.device} and {weight.device}"
        )
    return weight


def check_labels(
    labels: torch.Tensor,
    data: torch.Tensor,
    name: str,
    last: str,
    vocab: int,
    ignore_index: int,
    check_range: bool = True,
) -> torch.Tensor:
    """Labels [...] for ``data`` [..., X] (X = the ``last`` dim) over a vocabulary of ``vocab``:
    shape, integer dtype, device and (one host sync, skipped under torch.compile) range."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got dtype {labels.dtype}")
    if labels.shape != data.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal {name} shape without the {last} "
            f"dim {tuple(data.shape[:-1])} ({name} {tuple(data.shape)})"
        )
    if labels.device != data.device:
        raise ValueError(
            f"{name} and labels must be on the same device, got {data.device} and {labels.device}"
        )
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    labels = labels.long()
    if check_range and labels.numel() and not torch.compiler.is_compiling():
        _check_label_range(labels, vocab, ignore_index)
    return labels


def _check_float(name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} dtype {x.dtype} is not supported; use one of " + _names())


def _check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ValueError(
            f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; found "
            f"{int(labels[tuple(where)])} at index {tuple(where)} ({int(bad.sum())} bad in all)"
        )


def _names() -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)


def mask_to_labels(mask: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """Labels with ``ignore_index`` wherever the loss mask [...] is 0 (shape-checked)."""
    if not isinstance(mask, torch.Tensor) or mask.shape != labels.shape:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask shape {shape} must equal labels shape {tuple(labels.shape)}")
    return torch.where(mask.bool(), labels, ignore_index)
