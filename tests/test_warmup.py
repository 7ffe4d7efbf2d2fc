"""The kernel-cache warm-up (``python -m bnlab.kernels.warmup``): its groups run and leave the
process's settings as they were."""

import pytest
import torch

import bnlab.nn._projection as PR
import bnlab.nn.recurrent as R
from bnlab.kernels import cpu, warmup


def test_recurrent_group_restores_the_thread_count_and_the_split_thresholds():
    before = (R._PARALLEL_FROM, PR._PARALLEL_FROM, torch.get_num_threads())
    assert warmup.warm_recurrent() >= 0
    assert (R._PARALLEL_FROM, PR._PARALLEL_FROM, torch.get_num_threads()) == before


def test_kernels_group_leaves_the_serial_switch_off():
    assert warmup.warmup() >= 0
    assert cpu._serial_only == cpu._forked_from_omp
    x = torch.randn(8, 3, 4, 4)
    y, _, _ = cpu.forward_train(x, torch.ones(3), torch.zeros(3), 1e-5, act="relu", residual=None)
    torch.testing.assert_close(y, torch.relu(torch.nn.functional.batch_norm(
        x, None, None, torch.ones(3), torch.zeros(3), training=True)), rtol=1e-5, atol=1e-5)


def test_one_group_from_the_command_line(capsys):
    warmup.main(["--only", "recurrent"])
    assert "bnlab recurrent kernels warm" in capsys.readouterr().out


def test_float64_group_reaches_the_pool_kernels_and_leaves_the_switches_as_they_were():
    assert warmup.warm_float64() >= 0
    assert cpu._serial_only == cpu._forked_from_omp
    x = torch.randn(64, 3, 8, 8, dtype=torch.float64)
    pool = cpu.Thresholds(serial_below=0)
    y, _, _ = cpu.forward_train(x, None, None, 1e-5, act="relu", residual=None, thresholds=pool)
    torch.testing.assert_close(y, torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True)))


def test_several_groups_from_the_command_line_run_in_order(capsys):
    warmup.main(["--only", "float64", "fast"])
    out = capsys.readouterr().out
    assert out.index("bnlab float64 kernels warm") < out.index("bnlab fast kernels warm")


def test_an_unknown_group_is_refused():
    with pytest.raises(SystemExit):
        warmup.main(["--only", "everything"])
