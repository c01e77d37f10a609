"""The ``cpu`` backend: C++ kernels in csrc/cpu, bound with pybind11.

The extension ``steerkern._C`` is built by setup.py.  If it is missing (a
plain checkout, say), it is JIT-built from csrc/cpu with ninja and cached under
``$STEERKERN_CACHE`` (default ``~/.cache/steerkern``).  If that fails too, the
reference backend serves CPU tensors and one warning says why.
"""
from __future__ import annotations

from .. import backends
from ._build_flags import cpu_compile_args
from ._ext import jit_build, register_ops


def _load():
    try:
        from .. import _C  # built by setup.py

        return _C
    except ImportError:
        pass
    return jit_build("steerkern_cpu_jit", "cpu", ("*.cpp",), extra_cflags=cpu_compile_args())


try:
    _ext = _load()
    register_ops(_ext, "cpu", "cpu")
    capability = _ext.cpu_capability()
except Exception as err:  # any build or import failure falls back, loudly, once
    _ext = None
    capability = None
    backends.mark_unavailable("cpu", f"C++ extension not available ({type(err).__name__}: {err})")
    backends.warn_once("cpu-ext", f"steerkern: C++ CPU kernels unavailable, using the reference "
                                  f"backend on CPU ({type(err).__name__}: {err})")
