"""Kernel backends: each submodule registers its implementations with
:mod:`steerkern.backends` when it loads, and records why when it cannot."""
from . import cpu  # noqa: F401
from . import triton  # noqa: F401
from . import cuda  # noqa: F401
