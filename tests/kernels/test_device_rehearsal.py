"""The device-placement rehearsal (tests/nominal_device.py) of the public loss APIs, and the
Triton launch on the tensors' device (GPU_AUDIT 1.10)."""

from __future__ import annotations

import torch

from aepo.kernels import _launch
from tests.helpers import run_rehearsal


def test_loss_apis_placement_rehearsal():
    run_rehearsal("tests/kernels/rehearsal_api.py")


def test_launch_targets_the_tensors_device(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with FakeTensorMode():
        on_1, on_0 = torch.empty(2, device="cuda:1"), torch.empty(2, device="cuda:0")
    assert _launch.other_device((3, on_1, on_0)) == torch.device("cuda", 1)
    assert _launch.other_device((on_0, on_1)) is None  # the first CUDA tensor decides
    assert _launch.other_device((torch.empty(2), 7)) is None
