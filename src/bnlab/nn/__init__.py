"""bnlab's modules, with torch.nn's names and signatures."""

from .batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
]

from .masked import MaskedBatchNorm1d, SequenceBatchNorm
from .recurrent import BNGRU, BNGRUCell, BNLSTM, BNLSTMCell, BNRNN, BNRNNCell, NORM_MODES

__all__ += [
    "MaskedBatchNorm1d", "SequenceBatchNorm",
    "BNLSTM", "BNGRU", "BNRNN", "BNLSTMCell", "BNGRUCell", "BNRNNCell", "NORM_MODES",
]

from .variants import GhostBatchNorm1d, GhostBatchNorm2d

__all__ += ["GhostBatchNorm1d", "GhostBatchNorm2d"]
