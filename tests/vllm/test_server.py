"""Per-request steering through vLLM's OpenAI-compatible server.

The server runs as a subprocess on 127.0.0.1 (a free port) with the engine in
its own processes, so the plugin is loaded through its entry point there, and
the vectors are registered through the environment.  Every wait is bounded and
the server is killed at the end.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import hf_reference as ref

pytest.importorskip("vllm")

START_TIMEOUT_S = 240
N_TOKENS = 8
PROMPT = [1, 5, 6, 7, 8]
STEER = {"steer_vectors": ["joy", "calm"], "steer_coefs": [3.0, -2.0], "steer_layers": [1, 3]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=60):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def server(tiny_llama, vectors_file, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, STEERKERN_VLLM_VECTORS=vectors_file, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_llama,
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "8",
           "--kv-cache-memory-bytes", str(64 << 20), "--host", "127.0.0.1", "--port", str(port),
           "--disable-log-stats"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(1.0)
        yield base
    finally:
        # the server's own process group: it and the engine processes it started
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _complete(base, model, xargs=None, prompt=PROMPT):
    body = {"model": model, "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return _post(base + "/v1/completions", body)


def test_server_steers_requests_with_vllm_xargs(server, tiny_llama, vectors):
    status, body = _complete(server, tiny_llama, STEER)
    assert status == 200, body
    hf = ref.load(tiny_llama)
    total = 3.0 * vectors["joy"] - 2.0 * vectors["calm"]
    assert body["choices"][0]["token_ids"] == ref.greedy(hf, PROMPT, N_TOKENS, [ref.Add(total, [1, 3])])
    status, plain = _complete(server, tiny_llama)
    assert status == 200 and plain["choices"][0]["token_ids"] == ref.greedy(hf, PROMPT, N_TOKENS)


def test_server_rejects_bad_steering_and_keeps_serving(server, tiny_llama):
    bad = [{"steer_vectors": "nope"}, {"steer_vector": [0.1, 0.2, 0.3]}]
    jobs = [(x, True) for x in bad] + [(STEER, False), (None, False), (STEER, False)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: _complete(server, tiny_llama, job[0]), jobs))
    for (xargs, is_bad), (status, body) in zip(jobs, results):
        if is_bad:
            assert status == 400, body
            msg = json.dumps(body)
            assert ("unknown vector 'nope'" in msg) or ("expected 128 numbers" in msg), msg
        else:
            assert status == 200, body
            assert len(body["choices"][0]["token_ids"]) == N_TOKENS
    steered = [r[1]["choices"][0]["token_ids"] for (x, _), r in zip(jobs, results) if x is STEER]
    assert steered[0] == steered[1]
    with urllib.request.urlopen(server + "/health", timeout=5) as r:
        assert r.status == 200
