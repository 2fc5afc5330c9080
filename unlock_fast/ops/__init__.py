"""Validated entry points to the compiled kernels, one module per kernel family.

CUDA ops run asynchronously on the current torch CUDA stream of the tensors' device.
"""

from .core import backends
from .moments import moments_accumulate_
from .rsvd import eigh_topk, svd_topk
from .steer import steer_

__all__ = ["backends", "eigh_topk", "moments_accumulate_", "steer_", "svd_topk"]
