"""How bnlab's CPU kernels are compiled: numba options, the on-disk cache, and kernel variants.

**Options.** ``fastmath`` stays off everywhere (exact IEEE semantics, no reassociation): the
kernels' sums vectorize through hand-built lane loops instead (:mod:`._llvm`). The parallel
kernels (:data:`PARALLEL`) run their ``prange`` loops on numba's thread pool; the helpers they call
(:data:`SERIAL`) are compiled once each and inlined by LLVM.

**Cache.** Every function is compiled with ``cache=True`` into numba's on-disk cache, next to its
source. numba stamps a cached function with a hash of *its own* source file only, while the
compiled code of a kernel includes every helper it calls, from other files too: an edit to a
helper would leave the kernels that inline it stale. :func:`kernel_jit` therefore stamps each
function with one hash over every source file of compiled code in this package
(:data:`SOURCES`): an edit to any of them recompiles them all, as an edit to the single file they
once were did; the recurrent layers' kernels likewise with their own files
(:data:`RECURRENT_SOURCES`, :func:`recurrent_jit`). (An explicit ``NUMBA_CACHE_LOCATOR_CLASSES``
setting is honoured as it is.)

**Variants.** :func:`variant` compiles a kernel's code again under another name with some of its
module's constants replaced: the serial twins a forked child runs (the same code without
``parallel=True``) and the fused-activation kernels (the module constant ``ACT``; see
:mod:`.rows`). numba freezes a global int as a literal constant, so each variant is specialized
on it and the code of the others is pruned, while the helpers it passes the constant to are
compiled once per value (numba specializes a callee on a literal argument). numba's on-disk cache
keys a function by name and bytecode, not by its flags or globals: every variant has its own name.
"""

from __future__ import annotations

import functools
import hashlib
import os
import types as _types

from numba import njit
from numba.core import caching as _caching

PARALLEL = dict(parallel=True, cache=True, fastmath=False, nogil=True)
SERIAL = dict(cache=True, fastmath=False, nogil=True)

_HERE = os.path.dirname(os.path.abspath(__file__))
# every file of this package that holds compiled code or the options it is compiled with
SOURCES = ("_jit.py", "_llvm.py", "_serial.py", "rows.py", "cols.py", "stats.py")
#: the recurrent layers' compiled code (paths from this folder): the time loops and their matrix
#: products, and the two modules whose kernels call those products (numba links a callee's code into
#: every caller's library, and a library loaded from the cache resolves a callee's symbol to the
#: first copy of it loaded in the process: a caller left stale by an edit of a callee's file would
#: lend its stale copy to every fresh caller; measured: an edit of the matrix micro-kernel left
#: the input projection's cached library with the old one, and the time loops ran it, 1.5x slower)
RECURRENT_SOURCES = ("../nn/_recurrent_kernels.py", "../nn/_projection.py", "../lab/_stacked.py")


@functools.lru_cache(maxsize=None)
def sources_stamp(sources: tuple = SOURCES) -> str:
    """One hash over ``sources`` (default :data:`SOURCES`; read once per process)."""
    h = hashlib.sha256()
    for name in sources:
        with open(os.path.join(_HERE, name), "rb") as f:
            data = f.read()
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _cache_class(sources: tuple):
    """A numba function cache whose stamp is :func:`sources_stamp` of ``sources``."""

    class _Stamp:
        """Locator mixin: the freshness of a cached function is that of every file in ``sources``."""

        def get_source_stamp(self):
            return sources_stamp(sources)

    impl = type("KernelCacheImpl", (_caching.CompileResultCacheImpl,), {
        "_locator_classes": [type("Kernel" + c.__name__, (_Stamp, c), {})
                             for c in _caching.CompileResultCacheImpl._locator_classes]})
    return type("KernelCache", (_caching.FunctionCache,), {"_impl_class": impl})


def kernel_jit(sources: tuple = SOURCES, **options):
    """``numba.njit(**options)``, with the cache stamp of ``sources`` (default: the batch-norm
    kernels', :data:`SOURCES`) when ``cache=True``."""
    def decorate(f):
        d = njit(**options)(f)
        if options.get("cache"):
            d._cache = _cache_class(tuple(sources))(d.py_func)
        return d
    return decorate


def recurrent_jit(**options):
    """:func:`kernel_jit` stamped with :data:`RECURRENT_SOURCES`."""
    return kernel_jit(RECURRENT_SOURCES, **options)


def variant(kernel, suffix: str, options: dict, **constants):
    """``kernel``'s code compiled with ``options`` under the name ``<name><suffix>``, its module's
    globals named in ``constants`` replaced (the variant reads a copy of the module's globals;
    without ``constants`` it shares them)."""
    f = kernel.py_func
    glb = {**f.__globals__, **constants} if constants else f.__globals__
    g = _types.FunctionType(f.__code__, glb, f.__name__ + suffix, f.__defaults__, f.__closure__)
    g.__qualname__ = f.__qualname__ + suffix
    g.__module__ = f.__module__
    g.__doc__ = f.__doc__
    return kernel_jit(**options)(g)
