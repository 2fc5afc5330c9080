"""Streaming sufficient statistics of activation rows (:class:`Moments`)."""

from .buffer import DEFAULT_BUFFER_ROWS, RowBuffer
from .moments import ACCUMULATE_DTYPES, Moments, check_accumulate

__all__ = ["ACCUMULATE_DTYPES", "DEFAULT_BUFFER_ROWS", "Moments", "RowBuffer", "check_accumulate"]
