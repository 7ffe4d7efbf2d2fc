"""Discovery of the audit's plug-in modules (claims ``c<N>_*.py``, findings ``f<N>_*.py``): found by
file name in their package, imported with a guard, checked for the attributes they must define."""

from __future__ import annotations

import importlib
import pkgutil
import re
import traceback
from types import ModuleType


def discover(package: str, path, prefix: str, required: tuple[str, ...]) -> tuple[dict[str, ModuleType], dict[str, str]]:
    """``(modules, broken)``: every module ``<prefix><N>_<name>`` of ``package`` (its ``__path__``
    is ``path``) in the order of N, keyed by its upper-cased ``ID``; and, for each module that
    failed to import or lacks one of ``required``, the reason (a short traceback or the missing
    names), so that one broken module is reported instead of breaking the others."""
    pattern = re.compile(rf"^{prefix}(\d+)_\w+$")
    found = sorted((int(m.group(1)), info.name) for info in pkgutil.iter_modules(path)
                   if (m := pattern.match(info.name)))
    modules: dict[str, ModuleType] = {}
    broken: dict[str, str] = {}
    for _, name in found:
        try:
            mod = importlib.import_module(f"{package}.{name}")
        except Exception:
            broken[name] = traceback.format_exc(limit=3)
            continue
        lacking = [a for a in required if not hasattr(mod, a)]
        if lacking:
            broken[name] = f"{name} lacks {', '.join(lacking)}"
            continue
        modules[mod.ID.upper()] = mod
    return modules, broken
