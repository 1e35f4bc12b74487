"""Backend choice shared by every dispatcher.

``ONEREC_KERNELS`` (``torch`` or ``triton``) forces a backend; without it Triton runs on CUDA
tensors and PyTorch everywhere else. This is the only environment read of the package: kernels
import nothing of the project, so they cannot take the service's settings object.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

Backend = Literal["torch", "triton"]


class KernelBackendError(RuntimeError):
    """Raised when a forced backend cannot run on this machine."""


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str:
    """The operator's ONEREC_KERNELS override ('' when unset), read from the environment in this one place:
    kernels import nothing of the project, so the service's settings object cannot reach them."""
    return os.environ.get("ONEREC_KERNELS", "").strip().lower()


def choose_backend(t: torch.Tensor, forced: str | None = None) -> Backend:
    """Pick the backend for a call whose main input is ``t``."""
    want = (forced or forced_backend()).strip().lower()
    if want not in ("", "auto", "torch", "triton"):
        raise KernelBackendError(f"ONEREC_KERNELS={want!r}: expected 'torch' or 'triton'")
    if want == "torch":
        return "torch"
    if want == "triton":
        if not triton_available():
            raise KernelBackendError("ONEREC_KERNELS=triton but the triton package is not installed")
        if not t.is_cuda and not triton_interpreted():
            raise KernelBackendError(
                "ONEREC_KERNELS=triton needs CUDA tensors, or TRITON_INTERPRET=1 to run Triton on the CPU "
                f"(got a tensor on {t.device})"
            )
        return "triton"
    return "triton" if t.is_cuda and triton_available() else "torch"
