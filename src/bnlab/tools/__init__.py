"""Whole-model tools: convert, recalibrate."""

from .convert import convert, convert_report
from .recalibrate import recalibrate

__all__ = ["convert", "convert_report", "recalibrate"]
