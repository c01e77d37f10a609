"""The vLLM side of the plugin: the patches that :func:`register` applies.

vLLM loads general plugins in every process (the front end, the engine core,
each worker), so :func:`register` is idempotent and patches classes, not
instances:

* ``InputProcessor.process_inputs`` (front end): validates a request's
  steering keys against the registered vectors and the model, and rejects a
  bad request with a ``VLLMValidationError`` (HTTP 400 on the server) before
  it reaches the engine; a steered request gets a prefix-cache salt derived
  from its steering, so KV is shared only between identically steered
  requests.
* ``GPUModelRunner._model_forward`` (the V1 model runner, which the CPU
  runner extends): on the first call, patches the loaded model's norms
  (:func:`steerkern.integrations.vllm.runtime.install`); on every call, builds
  the batch's steering tables and per-row indices from the requests' rows,
  positions and extra arguments.
* ``UnquantizedLinearMethod`` (workers): with a sparsity plan registered,
  prepares the sparse layouts of the planned projections when the weights
  are loaded, and routes those layers through ``sparse_linear``
  (:mod:`.sparse`).

Steering needs the V1 model runner and eager execution (``enforce_eager``):
the plugin selects the V1 runner unless ``VLLM_USE_V2_MODEL_RUNNER`` is set,
and rejects steered requests when either is not in use.
``STEERKERN_VLLM_DISABLE=1`` makes the plugin do nothing.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional

from .sparse import BatchRows
from .spec import SteeringLibrary, fingerprint, has_steering

log = logging.getLogger("steerkern.vllm")

DISABLE_ENV = "STEERKERN_VLLM_DISABLE"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

_registered = False
_ROWS = BatchRows()  # which rows are generated tokens, for sparsity plans with dense prefill


def register() -> None:
    """The ``vllm.general_plugins`` entry point."""
    global _registered
    if _registered or os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return
    _registered = True
    # steering hooks the V1 model runner; keep an explicit user choice
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    _patch_input_processor()
    _patch_model_runner()
    _patch_linear()


# ---- front end ---------------------------------------------------------------------

def unsupported_reason(vllm_config) -> Optional[str]:
    """Why this engine cannot steer, or None."""
    archs = list(getattr(vllm_config.model_config.hf_config, "architectures", None) or [])
    if not set(archs) & set(SUPPORTED_ARCHITECTURES):
        return (f"steering supports the architectures {list(SUPPORTED_ARCHITECTURES)}, "
                f"this model is {archs}")
    if vllm_config.use_v2_model_runner:
        return "steering needs the V1 model runner (unset VLLM_USE_V2_MODEL_RUNNER or set it to 0)"
    from vllm.config import CompilationMode

    if vllm_config.compilation_config.mode != CompilationMode.NONE:
        return "steering needs eager execution: start vLLM with enforce_eager=True (--enforce-eager)"
    return None


def model_shape(vllm_config):
    text = vllm_config.model_config.hf_text_config
    return int(text.num_hidden_layers), int(text.hidden_size)


@functools.lru_cache(maxsize=None)
def _library_for(config_key: str) -> SteeringLibrary:
    import json

    return SteeringLibrary.from_config(json.loads(config_key))


def library(vllm_config) -> SteeringLibrary:
    import json

    extra = getattr(vllm_config, "additional_config", None) or {}
    return _library_for(json.dumps(dict(extra), sort_keys=True, default=str))


def validate(vllm_config, extra_args) -> None:
    """Raise ValueError when a request's steering cannot be served."""
    why = unsupported_reason(vllm_config)
    if why is not None:
        raise ValueError(why)
    num_layers, hidden = model_shape(vllm_config)
    library(vllm_config).parse(extra_args, num_layers, hidden)


def _patch_input_processor() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine import input_processor

    cls = input_processor.InputProcessor
    if getattr(cls.process_inputs, "_steerkern", False):
        return
    orig = cls.process_inputs

    @functools.wraps(orig)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        extra = getattr(params, "extra_args", None)
        steered = has_steering(extra)
        if steered:
            try:
                validate(self.vllm_config, extra)
            except ValueError as err:
                msg = str(err)
                raise VLLMValidationError(msg, parameter=msg.split(":")[0].split("[")[0]) from None
        request = orig(self, request_id, prompt, params, *args, **kwargs)
        if steered:
            salt = fingerprint(extra)
            request.cache_salt = salt if request.cache_salt is None else f"{request.cache_salt}|{salt}"
        return request

    process_inputs._steerkern = True
    cls.process_inputs = process_inputs


# ---- workers -----------------------------------------------------------------------

def _patch_model_runner() -> None:
    from vllm.v1.worker import gpu_model_runner

    cls = gpu_model_runner.GPUModelRunner
    if getattr(cls._model_forward, "_steerkern", False):
        return
    orig = cls._model_forward

    @functools.wraps(orig)
    def _model_forward(self, *args, **kwargs):
        runtime = _runtime_of(self)
        if runtime is None and not _SPARSE["dense_prefill"]:
            return orig(self, *args, **kwargs)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        num_rows = int(positions.shape[-1])
        if _SPARSE["dense_prefill"]:
            _generated_rows_v1(self, num_rows)
        if runtime is not None:
            runtime.forget_unless(self.requests.keys())
            runtime.prepare(_rows_v1(self), num_rows)
        try:
            return orig(self, *args, **kwargs)
        finally:
            if runtime is not None:
                runtime.finish()
            _ROWS.generated = None

    _model_forward._steerkern = True
    cls._model_forward = _model_forward


def _runtime_of(runner):
    """The runner's steering runtime, installed on first use (None: no steering here)."""
    runtime = runner.__dict__.get("_steerkern_runtime", False)
    if runtime is not False:
        return runtime
    runtime = None
    try:
        why = unsupported_reason(runner.vllm_config)
        lib = library(runner.vllm_config)
        if why is None:
            from . import runtime as rt

            num_layers, hidden = model_shape(runner.vllm_config)
            runtime = rt.SteeringRuntime(lib, num_layers, hidden, runner.device)
            rt.install(runner.get_model(), runtime)
            log.info("steerkern: steering enabled (%d registered vectors, %d plans)",
                     len(lib.vectors), len(lib.plans))
        else:
            log.info("steerkern: steering disabled: %s", why)
    except Exception as err:  # never take the engine down: serve unsteered, loudly
        log.error("steerkern: steering disabled: %s: %s", type(err).__name__, err)
        runtime = None
    runner._steerkern_runtime = runtime
    return runtime


def _rows_v1(runner):
    """The batch's requests in row order, from the V1 runner's state."""
    from .runtime import RequestRow

    batch = runner.input_batch
    n = batch.num_reqs
    qsl = runner.query_start_loc.np[: n + 1]
    computed = batch.num_computed_tokens_cpu[:n]
    rows = []
    for i, req_id in enumerate(batch.req_ids[:n]):
        state = runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        extra = getattr(params, "extra_args", None)
        if not has_steering(extra):
            continue
        rows.append(RequestRow(req_id, extra, int(qsl[i]), int(qsl[i + 1] - qsl[i]), int(computed[i]),
                               int(state.num_prompt_tokens)))
    return rows


def _generated_rows_v1(runner, num_rows: int) -> None:
    """Mark the rows that hold generated tokens (position >= prompt length);
    a step of generated tokens only (decode) leaves every row to the sparse
    kernel, with no dense matmul beside it."""
    import numpy as np
    import torch

    batch = runner.input_batch
    n = batch.num_reqs
    qsl = runner.query_start_loc.np[: n + 1]
    counts = np.diff(qsl)
    prompt = np.array([runner.requests[r].num_prompt_tokens for r in batch.req_ids[:n]], dtype=np.int64)
    first = batch.num_computed_tokens_cpu[:n].astype(np.int64)
    req = np.repeat(np.arange(n), counts)
    pos = first[req] + (np.arange(int(qsl[n])) - qsl[req])
    rows = np.nonzero(pos >= prompt[req])[0]
    if len(rows) == num_rows:
        _ROWS.generated = None
        return
    _ROWS.generated = torch.from_numpy(rows).to(runner.device, non_blocking=True)


# ---- sparse activation ----------------------------------------------------------------

_SPARSE = {"dense_prefill": False}


@functools.lru_cache(maxsize=None)
def _sparsity_plan(path: str):
    from ...plan import SparsityPlan

    return SparsityPlan.load(path)


def _patch_linear() -> None:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from . import sparse

    cls = UnquantizedLinearMethod
    if getattr(cls.apply, "_steerkern", False):
        return
    orig_load, orig_apply = cls.process_weights_after_loading, cls.apply

    @functools.wraps(orig_load)
    def process_weights_after_loading(self, layer):
        from vllm.config import get_current_vllm_config_or_none

        config = get_current_vllm_config_or_none()
        path = sparse.plan_path(getattr(config, "additional_config", None)) if config is not None else None
        if path:
            plan = _sparsity_plan(str(path))
            sparse.check_layers(plan, model_shape(config)[0])
            sp = sparse.prepare(layer, plan, _tp_all_reduce())
            if sp is not None:
                layer._steerkern_sparse = sp
                _SPARSE["dense_prefill"] |= sp.dense_prefill
        return orig_load(self, layer)

    @functools.wraps(orig_apply)
    def apply(self, layer, x, bias=None):
        sp = layer.__dict__.get("_steerkern_sparse")
        if sp is None:
            return orig_apply(self, layer, x, bias)
        return sparse.apply(sp, x, bias, lambda: orig_apply(self, layer, x, bias), _ROWS)

    apply._steerkern = True
    cls.process_weights_after_loading = process_weights_after_loading
    cls.apply = apply


def _tp_all_reduce():
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce if get_tensor_model_parallel_world_size() > 1 else None


__all__ = ["register", "validate", "unsupported_reason", "SUPPORTED_ARCHITECTURES"]
