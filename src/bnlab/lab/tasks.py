"""The task registry: a run config's ``"task"`` names the function that trains it.

A task is ``fn(config: dict) -> dict`` (JSON-able metrics), a pure function of its config: it seeds
every random generator it uses from the config, uses one torch thread, and treats divergence as a
result (``"diverged": true``), never as an exception.

Each task declares the source files its results depend on (``code=``, paths relative to the
``bnlab`` package). With the library core (:data:`CORE_CODE`) and the versions of torch and numpy
they form the task's code fingerprint, part of every run's identity in the store: edit one of
those files and the runs of that task execute again; edit anything else (the report, a claim's
decision rule) and the stored runs are reused.

Registering a task (e.g. in a claim module, so that importing :mod:`bnlab.lab.claims` registers
it in every worker)::

    from bnlab.lab.tasks import register_task

    def train_rnn(config):  # -> {"members": [...], ...}
        ...

    register_task("rnn", train_rnn, code=("lab/claims/c6_recurrent.py", "nn/recurrent.py"))
"""

from __future__ import annotations

import hashlib
import importlib
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy
import torch

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # src/bnlab

# the library code every task's numbers depend on
CORE_CODE = (
    "reference.py",
    "functional.py",
    "kernels/",
    "nn/batchnorm.py",
    "nn/variants.py",
    "tools/recalibrate.py",
)
# the lab code the built-in classification task depends on
LAB_CODE = ("lab/data.py", "lab/norms.py", "lab/models.py", "lab/optim.py", "lab/train.py")


@dataclass(frozen=True)
class Task:
    name: str
    fn: Callable[[dict], dict]
    code: tuple[str, ...]


_TASKS: dict[str, Task] = {}
_FINGERPRINTS: dict[str, str] = {}


def register_task(name: str, fn: Callable[[dict], dict], code: tuple[str, ...] = LAB_CODE) -> None:
    """Make ``fn`` the trainer of configs with ``"task": name``. ``code``: files it depends on."""
    _TASKS[name] = Task(name, fn, tuple(code))
    _FINGERPRINTS.pop(name, None)


def _ensure_registered(name: str) -> None:
    if name in _TASKS:
        return
    importlib.import_module("bnlab.lab.train")  # the built-in tasks
    if name not in _TASKS:
        importlib.import_module("bnlab.lab.claims")  # claim modules may register their own
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; registered tasks: {sorted(_TASKS)}")


def get_task(name: str) -> Task:
    _ensure_registered(name)
    return _TASKS[name]


def task_names() -> list[str]:
    return sorted(_TASKS)


def _files(spec: str) -> list[Path]:
    p = PACKAGE_DIR / spec
    if spec.endswith("/"):
        return sorted(q for q in p.rglob("*.py") if "__pycache__" not in q.parts)
    return [p] if p.exists() else []


def fingerprint(name: str) -> str:
    """sha256 over the task's code files, the library core and the numeric library versions."""
    if name in _FINGERPRINTS:
        return _FINGERPRINTS[name]
    task = get_task(name)
    h = hashlib.sha256()
    h.update(f"torch={torch.__version__};numpy={numpy.__version__};machine={platform.machine()}".encode())
    for spec in sorted(set(CORE_CODE) | set(task.code)):
        for f in _files(spec):
            h.update(str(f.relative_to(PACKAGE_DIR)).encode())
            h.update(b"\0")
            h.update(f.read_bytes())
    fp = h.hexdigest()[:16]
    _FINGERPRINTS[name] = fp
    return fp


def run(config: dict) -> dict:
    """Execute one run config with its task's function."""
    return get_task(config["task"]).fn(config)
