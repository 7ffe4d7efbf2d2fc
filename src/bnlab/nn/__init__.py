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

from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, convert_frozen_batchnorm

__all__ += ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "convert_frozen_batchnorm"]

from .sync import SyncBatchNorm

__all__ += ["SyncBatchNorm"]

from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

__all__ += ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]

from .act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d

__all__ += ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]
