"""Integrations of steerkern into serving engines.

* :mod:`steerkern.integrations.vllm` - a vLLM general plugin: per-request
  steering and sparse activation inside vLLM, installed with
  ``pip install steerkern[vllm]``.

Nothing here is imported by the core package: each integration imports its
engine only when it is used.
"""
