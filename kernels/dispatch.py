"""Backend choice shared by every dispatcher.

A dispatcher alone decides which implementation runs, from an explicit ``backend`` argument:
``"torch"`` or ``"triton"`` force one, ``None`` or ``"auto"`` take Triton on CUDA tensors (when it is
installed) and PyTorch everywhere else. The argument comes from the caller, which holds the
setting (the service's ``ONEREC_KERNELS``, passed down through its engine to the generator): this
package imports nothing of the project and reads no setting of its own, and a kernel never
re-decides (no silent fallback inside ``triton/``), as in generative-recommenders.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

Backend = Literal["torch", "triton"]
BACKEND_CHOICES = ("auto", "torch", "triton")  # what a caller may pass (None means "auto")


class KernelBackendError(RuntimeError):
    """Raised when a requested backend is unknown or cannot run this call on this machine."""


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Triton's own switch (``TRITON_INTERPRET=1``: kernels run on the CPU), which Triton reads itself."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_auto(requested: str | None) -> bool:
    """True when the caller left the choice to the dispatcher (shape rules may then apply)."""
    return requested is None or requested.strip().lower() in ("", "auto")


def choose_backend(t: torch.Tensor, requested: str | None = None) -> Backend:
    """The backend for a call whose main input is ``t``: ``requested`` when forced, else by device."""
    want = "auto" if is_auto(requested) else str(requested).strip().lower()
    if want not in BACKEND_CHOICES:
        raise KernelBackendError(f"kernel backend {requested!r}: expected 'torch' or 'triton' (or 'auto')")
    if want == "torch":
        return "torch"
    if want == "triton":
        if not triton_available():
            raise KernelBackendError("kernel backend 'triton' requested but the triton package is not installed")
        if not t.is_cuda and not triton_interpreted():
            raise KernelBackendError(
                "kernel backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run Triton on the CPU "
                f"(got a tensor on {t.device})"
            )
        return "triton"
    return "triton" if t.is_cuda and triton_available() else "torch"
