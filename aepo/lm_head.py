"""The fused head's plumbing, shared by the trainer (aepo.train) and the TRL drop-in
(aepo.integrations.trl): whether a Hugging Face model's output layer can be replaced by the
fused hidden-state loss, and how its forward is swapped for the duration of a call."""

from __future__ import annotations

import contextlib

import torch

# Config attributes of HF models whose output layer is more than hidden @ W^T.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
)


def fused_head_blocker(model) -> str | None:
    """Why the fused hidden-state loss cannot replace ``model``'s output layer, or None.

    Fused needs a plain bias-free ``nn.Linear`` lm_head, a backbone under
    ``model.base_model_prefix``, and no logit soft-capping or scaling in the config.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"the output layer is {type(head).__name__}, not a plain nn.Linear"
    if head.bias is not None:
        return "the lm_head has a bias"
    if not isinstance(getattr(model, model.base_model_prefix, None), torch.nn.Module):
        return f"no backbone at model.{model.base_model_prefix}"
    for name in _LOGIT_TRANSFORMS:
        value = getattr(model.config, name, None)
        if value not in (None, 0, 0.0, 1, 1.0):
            return f"the model transforms its logits ({name}={value})"
    return None


@contextlib.contextmanager
def redirect(module: torch.nn.Module, forward):
    """Temporarily replace ``module``'s forward (an instance attribute shadows the class's);
    its hooks (ZeRO-3's gathers among them) still run around the call."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous
