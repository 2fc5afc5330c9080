"""Validated entry points to the compiled kernels, one module per kernel family.

CUDA ops run asynchronously on the current torch CUDA stream of the tensors' device.
Importing this package registers the kernels as torch operators (``torch.ops.unlock_fast``,
see :mod:`.library`).
"""

from .core import backends
from .library import moments_accumulate_op, steer_op, steer_tokens_op, steer_unchecked_op
from .moments import MOMENTS_PRECISIONS, moments_accumulate_
from .rsvd import eigh_topk, svd_topk
from .steer import steer_, steer_tokens_, steer_unchecked_

__all__ = [
    "backends",
    "eigh_topk",
    "MOMENTS_PRECISIONS",
    "moments_accumulate_",
    "moments_accumulate_op",
    "steer_",
    "steer_op",
    "steer_tokens_",
    "steer_tokens_op",
    "steer_unchecked_",
    "steer_unchecked_op",
    "svd_topk",
]
