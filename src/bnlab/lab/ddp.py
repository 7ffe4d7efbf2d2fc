"""``bnlab train-ddp``: data-parallel training with :class:`bnlab.nn.SyncBatchNorm`, checked against
one process training on the combined batch.

The audit's convolutional testbed (:class:`bnlab.lab.models.CNN`, conv3x3 -> batch norm -> ReLU ->
maxpool, twice, on the digits data set) is converted with
:meth:`bnlab.nn.SyncBatchNorm.convert_sync_batchnorm` and wrapped in
:class:`torch.nn.parallel.DistributedDataParallel` on CPU (gloo). Every step draws one global batch
of ``batch`` samples (the same seeded draw in every process) and splits it between the processes,
evenly or unevenly (``split="uneven"``: shares proportional to 1, 2, 3, ...). Each process's loss
is ``world / batch * sum(cross-entropy over its samples)``: DistributedDataParallel averages the
processes' gradients, so the update is the gradient of the mean cross-entropy over the global
batch, the loss of one process training on all of it. With synchronized statistics the two
trainings are the same computation, up to float rounding: :func:`launch` trains both and reports
the largest difference of any parameter or buffer.

Run it with ``bnlab train-ddp --nproc 2`` (processes started here), or under torchrun:
``torchrun --nproc-per-node 2 -m bnlab.cli train-ddp``.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["DDPConfig", "build_model", "split_sizes", "train_ddp", "train_single", "launch", "run"]


@dataclass
class DDPConfig:
    steps: int = 20
    batch: int = 64
    lr: float = 0.1
    seed: int = 0
    channels: list[int] = field(default_factory=lambda: [8, 16])
    dtype: str = "float32"
    split: str = "even"  # or "uneven"


def _dtype(cfg: DDPConfig) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]


def build_model(cfg: DDPConfig, x_shape: tuple[int, ...], classes: int) -> torch.nn.Module:
    """The audit's CNN with bnlab batch norm, initialized from ``cfg.seed`` (the same in every process)."""
    from .models import build_model as build

    torch.manual_seed(cfg.seed)
    model = build({"arch": "cnn", "channels": list(cfg.channels), "act": "relu", "norm": "batch"}, 1, x_shape, classes)
    return model.to(_dtype(cfg))


def split_sizes(batch: int, world: int, split: str) -> list[int]:
    """Per-process batch sizes summing to ``batch``: as equal as possible, or proportional to 1, 2, 3, ..."""
    weights = [1] * world if split == "even" else list(range(1, world + 1))
    sizes = [batch * w // sum(weights) for w in weights]
    for i in range(batch - sum(sizes)):
        sizes[i % world] += 1
    return sizes


def _data(cfg: DDPConfig):
    from .data import prepare

    split = prepare({"name": "digits", "subset": None, "val_fraction": 0.0}, cfg.seed)
    return split.x_train.to(_dtype(cfg)), split.y_train, split.num_classes


def _batch(cfg: DDPConfig, step: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed * 100003 + step)
    return torch.randperm(n, generator=g)[: cfg.batch]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_ddp(cfg: DDPConfig, rank: int, world: int) -> dict:
    """Train in this process, one of ``world`` in the initialized default group; returns the mean
    loss per step and the final state (the same in every process)."""
    from ..nn import SyncBatchNorm

    x, y, classes = _data(cfg)
    model = SyncBatchNorm.convert_sync_batchnorm(build_model(cfg, tuple(x.shape[1:]), classes))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=cfg.lr)
    sizes = split_sizes(cfg.batch, world, cfg.split)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    losses = []
    for step in range(cfg.steps):
        idx = _batch(cfg, step, len(y))[lo:hi]
        logits = ddp(x[idx])[0]  # (G=1, n, K) -> (n, K)
        total = F.cross_entropy(logits, y[idx], reduction="sum")
        opt.zero_grad(set_to_none=True)
        (total * (world / cfg.batch)).backward()
        opt.step()
        seen = total.detach().to(torch.float64).reshape(1)
        dist.all_reduce(seen)
        losses.append(float(seen) / cfg.batch)
    return {"losses": losses, "state": _state(model), "sizes": sizes}


def train_single(cfg: DDPConfig) -> dict:
    """The same training in one process on the whole batch, with bnlab batch norm."""
    x, y, classes = _data(cfg)
    model = build_model(cfg, tuple(x.shape[1:]), classes)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    losses = []
    for step in range(cfg.steps):
        idx = _batch(cfg, step, len(y))
        loss = F.cross_entropy(model(x[idx])[0], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"losses": losses, "state": _state(model)}


def max_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two states' floating-point entries (inf if keys differ)."""
    if a.keys() != b.keys():
        return float("inf")
    out = 0.0
    for k, v in a.items():
        if v.is_floating_point():
            out = max(out, float((v.to(torch.float64) - b[k].to(torch.float64)).abs().max()) if v.numel() else 0.0)
        elif not torch.equal(v, b[k]):
            return float("inf")
    return out


_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def _worker(rank: int, world: int, port: int, cfg: dict, outdir: str, threads: int) -> None:
    torch.set_num_threads(threads)  # bnlab's numba kernels follow torch's count call by call
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = train_ddp(DDPConfig(**cfg), rank, world)
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: DDPConfig, nproc: int = 2, check: bool = True, start_method: str = "spawn") -> dict:
    """Start ``nproc`` processes (gloo on this machine), train, and (``check``) train the single-process
    reference here. Returns ``{"ranks": [per-process results], "single": ..., "max_diff": ...}``."""
    import torch.multiprocessing as tmp

    # the machine's cores shared out: every process's thread pools (torch's OpenMP, numba's) sized
    # before it imports them; pools sized for the whole machine in every process oversubscribe the
    # cores and slow each step many times over
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {k: str(threads) for k in _THREAD_ENV}
    if start_method == "fork" and "numba" in sys.modules:
        # a forked child inherits numba's configuration, pool size included: a NUMBA_NUM_THREADS
        # that differs from it makes numba's first compile in the child raise (numba re-reads the
        # environment then); bnlab's kernels take their thread count from torch's, set in the child
        import numba

        env["NUMBA_NUM_THREADS"] = str(numba.config.NUMBA_NUM_THREADS)
    saved = {k: os.environ.get(k) for k in _THREAD_ENV}
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory() as d:
            tmp.start_processes(_worker, args=(nproc, _free_port(), asdict(cfg), d, threads), nprocs=nproc,
                                join=True, start_method=start_method)
            ranks = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(nproc)]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = {"ranks": ranks}
    if check:
        out["single"] = train_single(cfg)
        out["max_diff"] = max_difference(ranks[0]["state"], out["single"]["state"])
    return out


def _report(cfg: DDPConfig, world: int, res: dict, single: dict | None) -> None:
    print(f"bnlab train-ddp: {world} processes (gloo, CPU), per-process batches {res['sizes']} of {cfg.batch}, "
          f"{cfg.steps} steps, SGD lr {cfg.lr}, {cfg.dtype}")
    for i, loss in enumerate(res["losses"]):
        if i in (0, len(res["losses"]) - 1) or (i + 1) % 5 == 0:
            ref = "" if single is None else f"   single process: {single['losses'][i]:.6f}"
            print(f"  step {i + 1:4d}  loss {loss:.6f}{ref}")
    if single is not None:
        print(f"largest difference of any parameter or buffer from single-process training on the combined batch: "
              f"{max_difference(res['state'], single['state']):.3g}")


def run(args) -> int:
    """The ``bnlab train-ddp`` command."""
    cfg = DDPConfig(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, dtype=args.dtype, split=args.split)
    if cfg.batch < 2:
        print("bnlab train-ddp: --batch must be at least 2 (batch norm needs 2 values per channel)")
        return 2
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: this process is one rank
        dist.init_process_group("gloo")
        try:
            rank, world = dist.get_rank(), dist.get_world_size()
            res = train_ddp(cfg, rank, world)
            if rank == 0:
                _report(cfg, world, res, None if args.no_check else train_single(cfg))
        finally:
            dist.destroy_process_group()
        return 0
    if args.nproc < 1:
        print("bnlab train-ddp: --nproc must be 1 or more")
        return 2
    out = launch(cfg, args.nproc, check=not args.no_check)
    _report(cfg, args.nproc, out["ranks"][0], out.get("single"))
    return 0
