"""Execute run configs as Ray tasks: ``bnlab audit --backend ray [--address auto|HOST:PORT]``.

:class:`RayRunner` has :class:`bnlab.lab.runner.LocalRunner`'s interface (``submit(key, config)``,
``wait() -> [(key, outcome)]``, ``close()``, ``capacity``, ``in_flight``), so the audit schedules,
stores and reports exactly as with the local pool: the driver (the ``bnlab audit`` process) commits
each result to the SQLite store as it arrives, and the progress bar counts them.

* **One run, one task**: ``num_cpus=1``, executed by :func:`bnlab.lab.runner.execute` in a worker
  set up like a local pool worker: ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and
  ``NUMBA_NUM_THREADS`` set to 1 before the worker imports torch or numba (the task's
  ``runtime_env``), then one torch thread and one numba thread. The same config gives the same
  numbers as on the local backend.
* **Capacity**: as many runs in flight as the cluster has CPUs (re-read as the audit goes, so a
  cluster that grows is used); ``--workers`` does not apply.
* **A worker that dies** (killed, out of memory, its node lost) has its run resubmitted by Ray, up
  to ``max_retries`` times (default 3); a run still failing after that is reported as a failed run
  (not stored), like a run whose local pool worker died.
* **Same code everywhere**: each task returns the code fingerprint its worker computed
  (:func:`bnlab.lab.tasks.fingerprint`: bnlab's source, library versions, CPU features); a run
  whose worker's fingerprint differs from the driver's is reported as failed rather than stored
  under the driver's key. Every node needs the same bnlab installed (``pip install "bnlab[ray]"``
  in the same environment as the driver).

Clusters: ``--address`` omitted starts a Ray instance on this machine for the audit (or joins the
cluster named by ``RAY_ADDRESS``); ``ray start --head`` on one machine, ``ray start
--address=HEAD:6379`` on the others, then ``--address auto`` (on a cluster node) or
``--address HEAD:6379``. Ray is optional; without it :class:`RayRunner` raises
:class:`RayUnavailable` naming the install command.
"""

from __future__ import annotations

import logging
import os
import time
import traceback

from .runner import _THREAD_ENV, _init_worker, execute

__all__ = ["RayRunner", "RayUnavailable", "require_ray"]

_INSTALL = 'pip install "bnlab[ray]"'
_ready_threads: int | None = None  # in a Ray worker: the thread count it was set up with


class RayUnavailable(RuntimeError):
    """Ray is not installed (or cannot start / reach the cluster)."""


def require_ray():
    """The ``ray`` module, or :class:`RayUnavailable` naming the install command."""
    try:
        import ray
    except ImportError as e:
        raise RayUnavailable(f"--backend ray needs Ray, which is not installed ({e}); install it with: {_INSTALL}") from None
    return ray


def _ray_execute(config: dict, threads: int) -> dict:
    """A Ray task: :func:`bnlab.lab.runner.execute` in a worker set up like a local pool worker."""
    global _ready_threads
    if _ready_threads != threads:
        _init_worker(threads)
        _ready_threads = threads
    out = execute(config)
    from .tasks import fingerprint

    try:
        out["meta"]["fingerprint"] = fingerprint(config["task"])
    except Exception:  # an unknown task: execute already reported it
        out["meta"]["fingerprint"] = None
    out["meta"]["backend"] = "ray"
    try:
        import ray

        out["meta"]["node"] = ray.get_runtime_context().get_node_id()
    except Exception:  # pragma: no cover
        pass
    return out


def _failure(error: str) -> dict:
    return {"ok": False, "result": None, "error": error, "wall_s": 0.0, "meta": {"backend": "ray"}}


class RayRunner:
    """Runs configs as Ray tasks on the cluster at ``address`` (see the module docstring).

    Args:
        address: None (a Ray instance on this machine, or ``RAY_ADDRESS``), ``"auto"`` (the
            cluster this machine belongs to) or ``"HOST:PORT"``.
        threads: torch and numba threads per run (default 1, as the local pool).
        max_retries: how many times Ray resubmits a run whose worker died (default 3).
        num_cpus: CPUs of a Ray instance started here (default: all); only without ``address``.
    """

    def __init__(self, address: str | None = None, threads: int = 1, max_retries: int = 3,
                 num_cpus: int | None = None) -> None:
        ray = require_ray()
        self._ray = ray
        self.threads = int(threads)
        self.max_retries = int(max_retries)
        self._owns = False
        if not ray.is_initialized():
            kw = dict(log_to_driver=False, logging_level=logging.WARNING)
            if address is None and not os.environ.get("RAY_ADDRESS"):
                kw.update(include_dashboard=False, num_cpus=num_cpus)
            try:
                ray.init(address=address, **kw)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = address or os.environ.get("RAY_ADDRESS") or "a new local instance"
                raise RayUnavailable(
                    f"cannot start or reach the Ray cluster at {where}: {e}. Start one with `ray start --head` "
                    "and pass --address auto (on that machine) or --address HOST:PORT"
                ) from e
            self._owns = True
        # the thread counts go with every task (its runtime_env), so that workers get them before they
        # import torch or numba also on a Ray instance this runner did not start
        env = {"env_vars": {k: str(self.threads) for k in _THREAD_ENV}}
        self._remote = ray.remote(num_cpus=1, max_retries=self.max_retries, runtime_env=env)(_ray_execute)
        self._refs: dict = {}  # ObjectRef -> (key, config)
        self._fingerprints: dict[str, str] = {}
        self._cpus = 1
        self._cpus_read = 0.0
        self.capacity  # noqa: B018 - read the cluster's size now

    @property
    def capacity(self) -> int:
        """How many runs may be in flight: the cluster's CPUs (re-read at most every 5 s)."""
        now = time.monotonic()
        if now - self._cpus_read > 5.0:
            try:
                self._cpus = max(1, int(self._ray.cluster_resources().get("CPU", 1)))
            except Exception:  # pragma: no cover - keep the last known size
                pass
            self._cpus_read = now
        return self._cpus

    @property
    def in_flight(self) -> int:
        return len(self._refs)

    def submit(self, key: str, config: dict) -> None:
        self._refs[self._remote.remote(config, self.threads)] = (key, config)

    def _expected(self, task: str) -> str | None:
        if task not in self._fingerprints:
            from .tasks import fingerprint

            try:
                self._fingerprints[task] = fingerprint(task)
            except Exception:
                self._fingerprints[task] = None
        return self._fingerprints[task]

    def wait(self) -> list[tuple[str, dict]]:
        """Block until at least one submitted run finishes; return every finished one."""
        ray = self._ray
        ready, rest = ray.wait(list(self._refs), num_returns=1)
        if rest:  # others that finished meanwhile
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready = list(ready) + list(more)
        out = []
        for ref in ready:
            key, config = self._refs.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError:  # the worker died more than max_retries times, the node was lost...
                outcome = _failure(f"the Ray task failed after {self.max_retries} retries:\n{traceback.format_exc()}")
            else:
                want = self._expected(config.get("task", ""))
                got = outcome.get("meta", {}).get("fingerprint")
                if outcome.get("ok") and want is not None and got != want:
                    outcome = _failure(
                        f"the run executed on Ray node {outcome['meta'].get('node')} whose bnlab code or numeric "
                        f"platform differs from this driver's (code fingerprint {got} there, {want} here); install "
                        "the same bnlab, torch, numpy and numba on every node (and use nodes of one CPU type)"
                    )
            out.append((key, outcome))
        return out

    def close(self, cancel: bool = False) -> None:
        ray = self._ray
        if cancel:
            for ref in list(self._refs):
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # already finished, or the cluster is gone
                    pass
        self._refs.clear()
        if self._owns and ray.is_initialized():
            ray.shutdown()
        self._owns = False
