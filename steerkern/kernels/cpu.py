"""The ``cpu`` backend: C++ kernels in csrc/cpu, bound with pybind11.

The extension ``steerkern._C`` is built by setup.py.  If it is missing (a
plain checkout, say), it is JIT-built from csrc/cpu with ninja and cached under
``$STEERKERN_CACHE`` (default ``~/.cache/steerkern``).  If that fails too, the
reference backend serves CPU tensors and one warning says why.
"""
from __future__ import annotations

import os
import pathlib

from .. import backends

_CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "cpu"


def _jit_build():
    from torch.utils import cpp_extension

    sources = sorted(str(p) for p in _CSRC.glob("*.cpp"))
    if not sources:
        raise RuntimeError(f"no C++ sources found next to the package (looked in {_CSRC.name}/)")
    cache = pathlib.Path(os.environ.get("STEERKERN_CACHE", pathlib.Path.home() / ".cache" / "steerkern"))
    build_dir = cache / "cpu_ext"
    build_dir.mkdir(parents=True, exist_ok=True)
    from ._build_flags import cpu_compile_args

    return cpp_extension.load(
        name="steerkern_cpu_jit",
        sources=sources,
        extra_cflags=cpu_compile_args(),
        build_directory=str(build_dir),
        verbose=False,
    )


def _load():
    try:
        from .. import _C  # built by setup.py

        return _C
    except ImportError:
        pass
    return _jit_build()


def _register(ext) -> None:
    backends.register_backend("cpu", lambda device_type: device_type == "cpu")
    for op in backends.OPS:
        # an extension without a native in-place op gets the write-back one
        if hasattr(ext, op):
            backends.register(op, "cpu", getattr(ext, op))


try:
    _ext = _load()
    _register(_ext)
    capability = _ext.cpu_capability()
except Exception as err:  # any build or import failure falls back, loudly, once
    _ext = None
    capability = None
    backends.mark_unavailable("cpu", f"C++ extension not available ({type(err).__name__}: {err})")
    backends.warn_once("cpu-ext", f"steerkern: C++ CPU kernels unavailable, using the reference "
                                  f"backend on CPU ({type(err).__name__}: {err})")
