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
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"logits dtype {logits.dtype} is not supported; use one of " + _names())
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dim, got {tuple(logits.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got dtype {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without the vocabulary "
            f"dim {tuple(logits.shape[:-1])} (logits {tuple(logits.shape)})"
        )
    if labels.device != logits.device:
        raise ValueError(
            f"logits and labels must be on the same device, got {logits.device} and {labels.device}"
        )
    labels = labels.long()
    if check_range and labels.numel() and not torch.compiler.is_compiling():
        _check_label_range(labels, logits.shape[-1], ignore_index)
    return labels


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
