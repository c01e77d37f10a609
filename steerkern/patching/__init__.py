"""Patching: where in a transformers model the ops run.

* :mod:`.registry` - per family, where layers, norms and projections live;
* :mod:`.modules` - the steering sites and sparse projections a patched model runs;
* :mod:`.forwards` - the steered layer forwards, one per layer kind;
* :mod:`.patch` - :func:`patch` / :func:`unpatch` and the :class:`PatchHandle`;
* :mod:`.apply` - class-level ``apply_steerkern_to_<family>`` functions.
"""
from .apply import *  # noqa: F401,F403
from .apply import ClassPatch
from .patch import PatchHandle, handle_of, patch, unpatch
from .registry import FAMILIES, Family, family_for, supported
