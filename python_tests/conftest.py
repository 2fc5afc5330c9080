"""Shared test configuration: the devices to test on and the tolerance table per dtype.

Devices: the CPU always, CUDA when ``torch.cuda.is_available()``. The environment variable
``UNLOCK_TEST_DEVICE`` forces the list (``cpu``, ``cuda`` or ``cpu,cuda``); forcing a device
that is not there is an error, not a skip. A test that takes a ``device`` argument and does
not parametrise it itself runs once per device; CUDA cases carry the ``cuda`` marker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# Tolerances for comparing a kernel's output with the float64 reference. fp32 math in the
# kernels; half-precision outputs are off by up to one rounding of their dtype.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 1e-3, "rtol": 1e-3},
    torch.bfloat16: {"atol": 1e-2, "rtol": 1e-2},
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
}


def available_devices() -> list[str]:
    """Devices the suite runs on, after UNLOCK_TEST_DEVICE."""
    forced = os.environ.get("UNLOCK_TEST_DEVICE", "").strip()
    if forced:
        return [d.strip() for d in forced.split(",") if d.strip()]
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def pytest_configure() -> None:
    for dev in available_devices():
        if dev not in ("cpu", "cuda"):
            raise pytest.UsageError(f"UNLOCK_TEST_DEVICE: unknown device {dev!r}")
        if dev == "cuda" and not torch.cuda.is_available():
            raise pytest.UsageError("UNLOCK_TEST_DEVICE asks for cuda, but no GPU is visible")


def _parametrized_by_test(metafunc: pytest.Metafunc, name: str) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if name in names:
            return True
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" in metafunc.fixturenames and not _parametrized_by_test(metafunc, "device"):
        params = [
            pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else [], id=d)
            for d in available_devices()
        ]
        metafunc.parametrize("device", params)


@pytest.fixture
def tolerances() -> dict[torch.dtype, dict[str, float]]:
    """The tolerance table per dtype (atol/rtol for torch.testing.assert_close)."""
    return TOLERANCES


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for the tests of a module, restored afterwards. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
