"""bnlab: batch normalization from first principles, and an audit of the claims made about it."""

from . import functional, nn, reference
from .tools.convert import convert

__version__ = "0.1.0"
__all__ = ["functional", "nn", "reference", "convert", "__version__"]
