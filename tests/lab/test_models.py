"""Stacked testbeds: members are independent, equal separate runs, and the lab's BN controls
(noisy, frozen statistics) behave as the protocols say."""

import pytest
import torch

import bnlab
from bnlab.lab.models import CNN, MLP
from bnlab.lab.norms import (NORMS, FrozenStatsBatchNorm1d, NoisyBatchNorm1d, make_norm, refresh_frozen_stats,
                             set_generator)
from bnlab.lab.optim import MemberOptimizer
from bnlab.lab.protocol import classify_config
from bnlab.lab.train import train_classify


def cfg(members, norm="batch", steps=15, data="digits", **kw):
    return classify_config(data={"name": data, "subset": None, "val_fraction": 0.0},
                           model={"arch": "mlp", "widths": [24, 24], "act": "relu", "norm": norm},
                           init={"kind": "kaiming"}, optim={"kind": "sgd", "momentum": 0.9}, batch=32, steps=steps,
                           members=members, **kw)


@pytest.mark.parametrize("norm", ["none", "batch", "ghost", "layer"])
def test_stacked_members_equal_separate_runs(norm):
    members = [{"seed": 0, "lr": 0.1}, {"seed": 1, "lr": 0.02, "gain": 2.0}]
    extra = {"norm_args": {"virtual_batch_size": 8}} if norm == "ghost" else {}
    c = cfg(members, norm)
    c["model"].update(extra)
    together = train_classify(c)["members"]
    for m, t in zip(members, together):
        c1 = cfg([m], norm)
        c1["model"].update(extra)
        alone = train_classify(c1)["members"][0]
        assert alone["test_acc"] == pytest.approx(t["test_acc"], abs=1e-9)
        assert alone["train_loss"] == pytest.approx(t["train_loss"], rel=1e-4)


def test_a_diverging_member_is_recorded_and_leaves_the_others_untouched():
    both = train_classify(cfg([{"seed": 0, "lr": 0.05}, {"seed": 0, "lr": 1e5}], "none"))["members"]
    alone = train_classify(cfg([{"seed": 0, "lr": 0.05}], "none"))["members"][0]
    assert both[1]["diverged"] and both[1]["test_acc"] is None
    assert not both[0]["diverged"] and both[0]["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-5)


def test_every_registered_norm_acts_per_member():
    torch.manual_seed(0)
    for name in NORMS:
        kw = {"virtual_batch_size": 4} if name == "ghost" else {"groups": 4} if name == "group" else {}
        net = MLP(2, 6, [8], 3, norm=name, norm_args=kw)
        net.input_layout = "members"
        x = torch.randn(2, 16, 6)
        set_generator(net, torch.Generator().manual_seed(0))  # the same noise draws for both calls
        state = {k: v.clone() for k, v in net.state_dict().items()}  # batch renorm's output reads its buffers
        y0 = net(x)[0]
        x2 = x.clone()
        x2[1] = x2[1] * 5 + 3  # change member 1's input only
        set_generator(net, torch.Generator().manual_seed(0))
        net.load_state_dict(state)
        torch.testing.assert_close(net(x2)[0], y0, msg=f"norm {name}: member 0 saw member 1")


def test_stacked_cnn_members_are_grouped_convolutions_and_independent():
    torch.manual_seed(0)
    net = CNN(3, 1, [4, 6], 10, norm="batch")
    x = torch.randn(3, 5, 1, 8, 8)
    out = net(x)
    assert out.shape == (3, 5, 10)
    x2 = x.clone()
    x2[2] += 1
    torch.testing.assert_close(net(x2)[:2], out[:2])


def test_noisy_bn_adds_fresh_noise_each_training_step_none_in_eval_or_recalibration():
    torch.manual_seed(0)
    noisy = NoisyBatchNorm1d(5)
    noisy.generator = torch.Generator().manual_seed(1)
    plain = bnlab.nn.BatchNorm1d(5)
    x = torch.randn(64, 5) * 3 + 2
    y1, y2, ref = noisy(x), noisy(x), plain(x)
    assert not torch.allclose(y1, ref) and not torch.allclose(y1, y2)
    scale = (y1 - y1.mean(0)).std(0) / (ref - ref.mean(0)).std(0)  # per-unit s in [0.5, 1.5]
    shift = y1.mean(0)  # per-unit m in [-1, 1]
    assert bool(((scale > 0.5) & (scale < 1.5)).all()) and bool((shift.abs() < 1).all())
    noisy.eval(), plain.eval()
    plain.load_state_dict(noisy.state_dict())
    torch.testing.assert_close(noisy(x), plain(x))
    net = torch.nn.Sequential(torch.nn.Linear(5, 5), NoisyBatchNorm1d(5), torch.nn.Linear(5, 3), bnlab.nn.BatchNorm1d(3))
    bnlab.tools.recalibrate(net, [x])
    with torch.no_grad():
        clean = net[2](net[1].eval()(net[0](x)))  # what eval feeds the second BN: no noise
    torch.testing.assert_close(net[3].running_mean, clean.mean(0), atol=1e-5, rtol=1e-5)


def test_frozen_stats_bn_normalizes_with_full_data_statistics_from_one_forward():
    torch.manual_seed(0)
    bn = FrozenStatsBatchNorm1d(4)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), bn)
    data = torch.randn(100, 3) * 2 + 1
    calls = []
    net[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    assert refresh_frozen_stats(net, data)
    assert calls == [100]  # one batched forward of the whole set
    h = net[0](data).detach()
    torch.testing.assert_close(bn.frozen_mean, h.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.frozen_var, h.var(0, unbiased=False), atol=1e-5, rtol=1e-5)
    xb = torch.randn(8, 3)
    hb = net[0](xb).detach()
    expect = (hb - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps)
    torch.testing.assert_close(net(xb), expect, atol=1e-5, rtol=1e-5)  # not the batch's own statistics
    assert not refresh_frozen_stats(torch.nn.Linear(2, 2), data)


def test_a_frozen_stats_run_trains_and_differs_from_bn():
    c = cfg([{"seed": 0, "lr": 0.05}], "batch", steps=None, epochs=2)
    f = cfg([{"seed": 0, "lr": 0.05}], "frozen-stats", steps=None, epochs=2)
    rb, rf = train_classify(c)["members"][0], train_classify(f)["members"][0]
    assert rf["test_acc"] > 0.5 and rf["train_loss"] != pytest.approx(rb["train_loss"], rel=1e-6)


@pytest.mark.parametrize("kind,momentum", [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0)])
def test_member_optimizer_matches_torch_per_member(kind, momentum):
    torch.manual_seed(0)
    lrs = [0.1, 0.01]
    p = torch.randn(2, 3, 4, requires_grad=True)
    opt = MemberOptimizer([p], 2, lrs, kind, momentum=momentum)
    refs = [p.detach()[g].clone().requires_grad_() for g in range(2)]
    topts = [torch.optim.SGD([r], lr=lr, momentum=momentum) if kind == "sgd" else torch.optim.Adam([r], lr=lr)
             for r, lr in zip(refs, lrs)]
    for _ in range(4):
        opt.zero_grad()
        (p ** 3).sum().backward()
        opt.step()
        for r, o in zip(refs, topts):
            o.zero_grad()
            (r ** 3).sum().backward()
            o.step()
    for g in range(2):
        torch.testing.assert_close(p.detach()[g], refs[g].detach(), atol=1e-6, rtol=1e-5)


def test_make_norm_rejects_unknown_names_and_bad_affine():
    with pytest.raises(KeyError, match="unknown norm 'bogus'"):
        make_norm("bogus", 1, 4)
    with pytest.raises(ValueError, match="affine must be one of"):
        make_norm("batch", 1, 4, affine="half")
    beta_only = make_norm("batch", 2, 4, affine="beta")
    assert not beta_only.weight.requires_grad and beta_only.bias.requires_grad


def test_per_member_affine_freezes_gamma_and_beta_as_each_arm_says():
    from bnlab.nn.batchnorm import _BatchNorm

    arms = ["both", "none", "gamma", "beta"]
    c = classify_config(data={"name": "digits", "subset": None, "val_fraction": 0.0},
                        model={"arch": "mlp", "widths": [8], "norm": "batch", "norm_args": {"affine": "both"}},
                        init={"kind": "default"}, optim={"kind": "adam"}, batch=32, steps=10,
                        members=[{"seed": 0, "lr": 0.01, "affine": a} for a in arms])
    keep = {}
    r = train_classify(c, keep=keep)
    assert [m["affine"] for m in r["members"]] == arms
    bn = next(m for m in keep["model"].modules() if isinstance(m, _BatchNorm))
    w, b = bn.weight.detach().view(4, 8), bn.bias.detach().view(4, 8)
    moved = lambda t, v: bool((t - v).abs().max() > 1e-4)  # noqa: E731
    assert moved(w[0], 1) and moved(b[0], 0)  # both
    assert not moved(w[1], 1) and not moved(b[1], 0)  # none
    assert moved(w[2], 1) and not moved(b[2], 0)  # gamma only
    assert not moved(w[3], 1) and moved(b[3], 0)  # beta only


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_the_cnn_in_channels_last_is_the_nchw_cnn(norm):
    # the CNN runs its stacked members in channels_last memory (faster on CPU for many channels of
    # small images): outputs, every gradient and every buffer as the NCHW network's, every norm
    torch.manual_seed(0)
    nets = [CNN(3, 1, [8, 16], 10, norm=norm, channels_last=cl) for cl in (True, False)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(16, 1, 8, 8)
    outs = []
    for net in nets:
        torch.manual_seed(1)  # the noisy norm's draws
        out = net(x)
        out.square().sum().backward()
        outs.append(out)
    assert nets[0].features[0](x.repeat(1, 3, 1, 1).contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(nets[0].named_parameters(), nets[1].named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4, msg=name)
    for (name, a), (_, b) in zip(nets[0].named_buffers(), nets[1].named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
