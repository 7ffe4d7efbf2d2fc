"""Whole-model tools: convert, recalibrate, fold, doctor."""

from .convert import convert, convert_report
from .recalibrate import recalibrate

__all__ = ["convert", "convert_report", "recalibrate"]

from .fold import FoldEntry, FoldReport, UntraceableModelError, fold

__all__ += ["fold", "FoldEntry", "FoldReport", "UntraceableModelError"]

from .doctor import DoctorError, Finding, doctor

__all__ += ["doctor", "Finding", "DoctorError"]

from . import interop
from .interop import flax_config, from_flax, from_keras, keras_config, to_flax, to_keras

__all__ += ["interop", "to_keras", "from_keras", "keras_config", "to_flax", "from_flax", "flax_config"]

from .freeze import accumulate, freeze, unfreeze

__all__ += ["freeze", "unfreeze", "accumulate"]
