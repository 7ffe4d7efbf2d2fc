"""The task registry: a run config's ``"task"`` names the function that trains it.

A task is ``fn(config: dict) -> dict`` (JSON-able metrics), a pure function of its config: it seeds
every random generator it uses from the config, uses one torch thread, and treats divergence as a
result (``"diverged": true``), never as an exception.

Each task declares the source files its results depend on (``code=``, paths relative to the
``bnlab`` package). With the library core (:data:`CORE_CODE`), the versions of the numeric
libraries (torch, numpy, numba, and the data generators scikit-learn and mnist1d) and the CPU the
numba kernels are compiled for (its name and feature flags) they form the task's code fingerprint, part of every run's identity in the store: edit one of
those files and the runs of that task execute again; edit anything else (the report, a claim's
decision rule) and the stored runs are reused.

The built-in tasks are declared here by name (:data:`BUILTIN`: the task, the function as
``"module:function"``, its code) and their modules are imported only when a run needs them, so
the trainers never import this registry (no import circle). Registering a task (e.g. in a claim
module, so that importing :mod:`bnlab.lab.claims` registers it in every worker)::

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
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy
import torch

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # src/bnlab

# the library code every task's numbers depend on
CORE_CODE = (
    "reference.py",
    "functional.py",
    "policy.py",
    "kernels/",
    "nn/batchnorm.py",
    "nn/variants.py",
    "tools/recalibrate.py",
)
# the lab code the built-in classification task depends on
LAB_CODE = ("lab/data.py", "lab/norms.py", "lab/models.py", "lab/optim.py", "lab/train.py", "nn/renorm.py")


@dataclass(frozen=True)
class Task:
    name: str
    fn: Callable[[dict], dict] | str  # the function, or "module:function" imported on first use
    code: tuple[str, ...]

    def resolve(self) -> Callable[[dict], dict]:
        if callable(self.fn):
            return self.fn
        module, _, attr = self.fn.partition(":")
        return getattr(importlib.import_module(module), attr)


# the built-in tasks: imported only when a run needs them (the trainers never import this module)
BUILTIN: dict[str, Task] = {
    "classify": Task("classify", "bnlab.lab.train:train_classify", LAB_CODE),
}

_TASKS: dict[str, Task] = {}
_FINGERPRINTS: dict[str, str] = {}


def register_task(name: str, fn: Callable[[dict], dict], code: tuple[str, ...] = LAB_CODE) -> None:
    """Make ``fn`` the trainer of configs with ``"task": name``. ``code``: files it depends on."""
    _TASKS[name] = Task(name, fn, tuple(code))
    _FINGERPRINTS.pop(name, None)


def _lookup(name: str) -> Task:
    if name in _TASKS:
        return _TASKS[name]
    if name in BUILTIN:
        return BUILTIN[name]
    importlib.import_module("bnlab.lab.claims")  # claim modules may register their own
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; registered tasks: {task_names()}")
    return _TASKS[name]


def get_task(name: str) -> Task:
    return _lookup(name)


def task_names() -> list[str]:
    return sorted(set(_TASKS) | set(BUILTIN))


def _files(spec: str) -> list[Path]:
    p = PACKAGE_DIR / spec
    if spec.endswith("/"):
        return sorted(q for q in p.rglob("*.py") if "__pycache__" not in q.parts)
    return [p] if p.exists() else []


def _version(dist: str) -> str:
    """A distribution's installed version, read from its metadata (no import)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def platform_id() -> str:
    """The numeric environment every run depends on: library versions (torch, numpy, numba; the
    data generators scikit-learn and mnist1d), the machine, and the CPU the numba kernels are
    compiled for (numba's target CPU name and feature flags, as numba's code generator picks them:
    ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` when set, else the host's)."""
    global _PLATFORM
    if _PLATFORM is None:
        parts = [f"torch={torch.__version__}", f"numpy={numpy.__version__}", f"machine={platform.machine()}"]
        for dist in ("numba", "llvmlite", "scikit-learn", "mnist1d"):
            parts.append(f"{dist}={_version(dist)}")
        name, features = numba_target()
        parts.append(f"cpu={name}")
        parts.append(f"cpu_features={features}")
        _PLATFORM = ";".join(parts)
    return _PLATFORM


def numba_target() -> tuple[str, str]:
    """(CPU name, feature flags) numba compiles the kernels for ("absent" without numba)."""
    try:
        import llvmlite.binding as ll
        from numba.core import codegen, config
    except Exception:
        return "absent", "absent"
    name = config.CPU_NAME or ll.get_host_cpu_name()
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else codegen.get_host_cpu_features()
    return str(name), str(features)


_PLATFORM: str | None = None


def fingerprint(name: str) -> str:
    """sha256 over the task's code files, the library core and :func:`platform_id`."""
    if name in _FINGERPRINTS:
        return _FINGERPRINTS[name]
    task = get_task(name)
    h = hashlib.sha256()
    h.update(platform_id().encode())
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
    return get_task(config["task"]).resolve()(config)
