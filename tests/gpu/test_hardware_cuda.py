"""The worker's hardware detection (nvidia-smi, no torch) agrees with what torch sees."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.gpu import GPU
from worker.registry import class_from_gpu_name, detect_hardware, resolve_hardware

pytestmark = GPU


def test_nvidia_smi_detection_matches_torch() -> None:
    found = detect_hardware()
    properties = torch.cuda.get_device_properties(0)

    assert found.gpu_name == torch.cuda.get_device_name(0)
    # nvidia-smi's memory.total and torch's total_memory differ by what the driver keeps.
    assert found.memory_gb == pytest.approx(properties.total_memory / 2**30, rel=0.03)
    assert found.gpu_class == class_from_gpu_name(found.gpu_name, found.memory_gb)
    assert found.gpu_class != "cpu" and found.gpu_class.endswith("gb")
    print(f"detected {found}")


def test_resolve_hardware_takes_detection_unless_configured() -> None:
    found = detect_hardware()
    plain = SimpleNamespace(worker_gpu_class=None, worker_memory_gb=None)
    forced = SimpleNamespace(worker_gpu_class="big", worker_memory_gb=12.5)

    assert resolve_hardware(plain) == found
    resolved = resolve_hardware(forced)
    assert (resolved.gpu_name, resolved.gpu_class, resolved.memory_gb) == (
        found.gpu_name,
        "big",
        12.5,
    )
