"""steerkern inside vLLM: per-request steering, as a vLLM general plugin.

Install with ``pip install steerkern[vllm]``; vLLM then loads the plugin in
every process through the ``vllm.general_plugins`` entry point
(``steerkern = steerkern.integrations.vllm:register``).

Start-up: register named vectors (a safetensors file) and steering plans with
``STEERKERN_VLLM_VECTORS`` / ``STEERKERN_VLLM_PLANS`` or vLLM's
``--additional-config '{"steerkern": {"vectors": ..., "plans": ...}}'``, and
run eagerly (``enforce_eager=True``).

Per request, offline::

    SamplingParams(max_tokens=32, extra_args={
        "steer_vectors": ["calm", "formal"], "steer_coefs": [4.0, -2.0],
        "steer_layers": [10, 11, 12], "steer_site": "pre"})

or on the OpenAI-compatible server, in the request body::

    {"model": ..., "prompt": ..., "vllm_xargs": {"steer_vectors": "calm", "steer_coefs": 4.0}}

See :mod:`.spec` for every key, :mod:`.runtime` for how a batch is steered
(requests without steering are computed bit-exactly as by plain vLLM), and
:mod:`.plugin` for the hook points.
"""
from .spec import KEYS, SteeringLibrary, fingerprint, has_steering


def register() -> None:
    """The ``vllm.general_plugins`` entry point (imports vLLM)."""
    from .plugin import register as _register

    _register()


__all__ = ["register", "SteeringLibrary", "KEYS", "has_steering", "fingerprint"]
