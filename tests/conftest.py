import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("BNLAB_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- Keras 3 (tests of bnlab.tools.interop and renorm)
@pytest.fixture(scope="session")
def keras():
    """Keras 3 on its torch backend; the test skips without it (or on another backend)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    k = pytest.importorskip("keras")
    if k.backend.backend() != "torch":
        pytest.skip(f"keras runs on the {k.backend.backend()} backend here (set KERAS_BACKEND=torch before import)")
    return k


@pytest.fixture
def keras_layer(keras):
    """``make(layer, input_shape, channels_last=False)``: a Keras ``BatchNormalization`` with the
    configuration and weights of a torch/bnlab batch-norm ``layer`` (:mod:`bnlab.tools.interop`),
    built for ``input_shape`` (``(None, ...)``)."""
    from bnlab.tools import interop

    def make(layer, input_shape, channels_last: bool = False):
        k = keras.layers.BatchNormalization(**interop.keras_config(layer, channels_last=channels_last))
        k.build(tuple(input_shape))
        interop.keras_set_weights(k, interop.to_keras(layer))
        return k

    return make
