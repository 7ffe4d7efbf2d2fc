"""Whole-model tools: convert, recalibrate."""

from .convert import convert
from .recalibrate import recalibrate

__all__ = ["convert", "recalibrate"]
