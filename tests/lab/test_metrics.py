"""The claims' metrics computed from real tiny training runs, checked against values worked out by
hand (or recomputed independently from the trained model)."""

import math

import pytest
import torch
import torch.nn.functional as F

from bnlab.lab import metrics as M
from bnlab.lab.models import StackedLinear
from bnlab.lab.protocol import classify_config
from bnlab.lab.train import setup, train_classify


def digits_config(members, widths=(32,), norm="none", steps=40, **kw):
    return classify_config(data={"name": "digits", "subset": None, "val_fraction": 0.0},
                           model={"arch": "mlp", "widths": list(widths), "act": "relu", "norm": norm},
                           init={"kind": "kaiming"}, optim={"kind": "sgd", "momentum": 0.0}, batch=32, steps=steps,
                           members=members, **kw)


def test_max_stable_lr_from_a_real_run_where_the_largest_rate_diverges():
    r = train_classify(digits_config([{"seed": 0, "lr": lr} for lr in (0.05, 0.5, 1e4)]))
    small, mid, huge = r["members"]
    assert huge["diverged"] and huge["diverged_step"] is not None and huge["train_loss"] is None
    assert not small["diverged"] and small["train_loss"] < M.STABLE_LOSS
    assert not mid["diverged"] and mid["train_loss"] < M.STABLE_LOSS
    assert M.max_stable_lr(r["members"]) == 0.5
    assert M.lr_ratio(5.0, 0.5) == pytest.approx(10.0)
    assert M.lr_ratio(1.0, 0.0) == math.inf and M.lr_ratio(0.0, 0.0) == 1.0


def test_a_finite_run_above_the_loss_limit_is_unstable():
    assert not M.is_stable({"diverged": False, "train_loss": 0.95 * math.log(10), "lr": 1})
    assert M.is_stable({"diverged": False, "train_loss": 0.85 * math.log(10), "lr": 1})
    assert M.max_stable_lr([{"diverged": True, "train_loss": None, "lr": 1}]) == 0.0


def test_lr_width_counts_grid_points_within_two_accuracy_points_of_the_best():
    assert M.lr_width({0.1: 0.60, 0.3: 0.585, 1.0: 0.579, 3.0: None}) == 2


def test_steps_to_target_is_the_first_check_that_reaches_it_and_the_run_stops_there():
    cfg = digits_config([{"seed": 1, "lr": 0.05}], steps=400,
                        eval={"every": 5, "target": 0.8, "stop_at_target": True})
    r = train_classify(cfg)
    m = r["members"][0]
    c = m["curve"]
    s = m["steps_to_target"]
    assert s is not None and s % 5 == 0 and r["steps_run"] == s
    i = c["step"].index(s)
    assert c["test_acc"][i] >= 0.8 and all(a < 0.8 for a in c["test_acc"][:i])
    assert M.steps_to_target(c, 0.8) == s
    assert c["step"] == list(range(5, s + 1, 5))
    assert m["time_to_target"] == pytest.approx(c["time"][i])
    assert M.censored(None, 2000) == (2000.0, True) and M.censored(35, 2000) == (35.0, False)


def test_gap_and_accuracies_match_an_independent_evaluation_of_the_trained_model():
    keep = {}
    r = train_classify(digits_config([{"seed": 0, "lr": 0.1}], norm="batch", steps=60), keep=keep)
    m = r["members"][0]
    model, st = keep["model"], keep["setup"]
    model.eval()
    model.input_layout = "shared"
    with torch.no_grad():
        train_acc = (model(st.x_train)[0].argmax(-1) == st.y_train).double().mean().item()
        xt, yt = st.eval_sets["test"]
        logits = model(xt)[0]
        test_acc = (logits.argmax(-1) == yt).double().mean().item()
        nll = F.cross_entropy(logits.double(), yt).item()
    assert m["train_acc"] == pytest.approx(train_acc) and m["test_acc"] == pytest.approx(test_acc)
    assert m["test_nll"] == pytest.approx(nll, rel=1e-5)
    assert M.gap_points(m) == pytest.approx(100 * (train_acc - test_acc))


def test_precise_bn_leaves_population_statistics_of_the_whole_training_set():
    keep = {}
    train_classify(digits_config([{"seed": 0, "lr": 0.1}, {"seed": 0, "lr": 0.01}], norm="batch", steps=20), keep=keep)
    model, st = keep["model"], keep["setup"]
    lin, bn = model.hidden[0], model.hidden[1]
    with torch.no_grad():
        h = lin(st.x_train.reshape(st.x_train.shape[0], -1), layout="shared").double()  # (N, G*C)
    torch.testing.assert_close(bn.running_mean.double(), h.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), h.var(0, unbiased=True), rtol=1e-4, atol=1e-5)


def test_init_gradient_ratio_equals_a_hand_computation_on_the_first_batch():
    cfg = digits_config([{"seed": 3, "lr": 0.1, "gain": 1.0}, {"seed": 3, "lr": 0.1, "gain": 2.0}], widths=(16, 16, 16),
                        norm="batch", steps=1, diagnostics=("grad_ratio",))
    r = train_classify(cfg)
    st = setup(cfg)
    model = st.model
    idx = torch.randperm(st.x_train.shape[0], generator=st.order_gens[3])[: st.batch]
    model.train()
    model.input_layout = "shared"
    logits = model(st.x_train[idx])  # (G, B, K)
    loss = sum(F.cross_entropy(logits[g], st.y_train[idx]) for g in range(2))
    loss.backward()
    lins = [m for m in model.modules() if isinstance(m, StackedLinear)]
    for g, m in enumerate(r["members"]):
        first = lins[0].weight.grad[g].norm().item()
        last = lins[-1].weight.grad[g].norm().item()
        assert m["grad_first"] == pytest.approx(first, rel=1e-4)
        assert m["grad_ratio"] == pytest.approx(first / last, rel=1e-4)


def test_trainable_area_and_spread_on_a_grid_worked_out_by_hand():
    acc = {(2, 1.0): 0.9, (2, 2.0): 0.79, (8, 1.0): 0.8, (8, 2.0): 0.1}
    assert M.trainable_area(acc, 0.8) == 0.5
    assert M.spread([0.9, 0.79]) == pytest.approx(0.11)
    assert M.acc_or_chance({"test_acc": None}) == 0.1
