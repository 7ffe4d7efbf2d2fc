"""The kernel-cache warm-up (``python -m bnlab.kernels.warmup``): its groups run and leave the
process's settings as they were."""

import torch

import bnlab.nn._projection as PR
import bnlab.nn.recurrent as R
from bnlab.kernels import cpu, warmup


def test_recurrent_group_restores_the_thread_count_and_the_split_thresholds():
    before = (R._PARALLEL_FROM, PR._PARALLEL_FROM, torch.get_num_threads())
    assert warmup.warm_recurrent() >= 0
    assert (R._PARALLEL_FROM, PR._PARALLEL_FROM, torch.get_num_threads()) == before


def test_activations_group_leaves_the_serial_switch_off():
    assert warmup.warm_activations() >= 0
    assert cpu._serial_only == cpu._forked_from_omp
    x = torch.randn(8, 3, 4, 4)
    y, _, _ = cpu.forward_train(x, torch.ones(3), torch.zeros(3), 1e-5, act="silu", residual=None)
    torch.testing.assert_close(y, torch.nn.functional.silu(torch.nn.functional.batch_norm(
        x, None, None, torch.ones(3), torch.zeros(3), training=True)), rtol=1e-5, atol=1e-5)


def test_one_group_from_the_command_line(capsys):
    warmup.main(["--only", "recurrent"])
    assert "bnlab recurrent kernels warm" in capsys.readouterr().out
