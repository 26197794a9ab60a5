"""Real `angle-rt serve` processes on 127.0.0.1 (port 0: the server picks a free one and
logs it), always stopped by the fixture that started them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-angle-rt-test"
_URL = re.compile(r'"url":\s*"(http://127\.0\.0\.1:\d+)"')


def same_bits(got, want: np.ndarray) -> None:
    """Served floats (JSON, shortest float32 repr) are `want` bit for bit: every artifact
    gives a text one vector whatever shares its batch (docs/precision.md)."""
    got = np.asarray(got, dtype=np.float64).astype(np.float32)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()
                if line.startswith("{")]

    def metrics(self) -> dict[str, float]:
        """`/metrics` samples as {'name{labels}': value}."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {k: float(v) for k, _, v in (line.rpartition(" ") for line in
                                            text.splitlines() if not line.startswith("#"))}


@contextmanager
def serve(log_dir: Path, *args: str, env: dict[str, str] | None = None,
          timeout: float = 90) -> Iterator[Server]:
    """Start `python -m angle_rt.cli serve ARGS --port 0`, wait for /ready, yield it; stop it
    (SIGTERM, then SIGKILL) however the test ends."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"serve-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "angle_rt.cli", "serve", *args, "--host", "127.0.0.1",
           "--port", "0"]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                                env=full_env)
    try:
        url = _wait_for_url(proc, log, timeout)
        _wait_ready(proc, url, log, timeout)
        yield Server(proc, url, log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _wait_for_url(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = _URL.search(log.read_text())
        if m:
            return m.group(1)
        if proc.poll() is not None:
            pytest.fail(f"angle-rt serve exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"angle-rt serve did not start within {timeout}s:\n{log.read_text()}")


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"angle-rt serve exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"angle-rt serve not ready within {timeout}s:\n{log.read_text()}")


def error_of(response: httpx.Response) -> dict:
    """The `error` object of an OpenAI-shaped error body (its four keys checked)."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.fixture(scope="module")
def minilm_server(minilm_precisions, tmp_path_factory) -> Iterator[Server]:
    """MiniLM served as `minilm`, key from ANGLE_RT_API_KEY, default settings otherwise: the
    default CPU artifact (int8-dynamic, per-token scales), so every vector test here also
    checks that batching across clients leaves a text's vector as `encode` gives it."""
    with serve(tmp_path_factory.mktemp("serve"), f"minilm={minilm_precisions}",
               env={"ANGLE_RT_API_KEY": API_KEY}) as server:
        yield server


@pytest.fixture(scope="module")
def tiny_server(tiny_bert_bundle, tmp_path_factory) -> Iterator[Server]:
    """The tiny random BERT (max_length 64) with strict limits: no truncation, 64 KB bodies,
    16 inputs per request, 2 requests in flight, 64 queued tokens."""
    with serve(tmp_path_factory.mktemp("serve"), str(tiny_bert_bundle),
               "--served-model-name", "tiny", "--api-key", API_KEY, "--no-truncate",
               "--payload-limit", "64KB", "--max-client-batch-size", "16",
               "--max-concurrent-requests", "2", "--max-queued-tokens", "64") as server:
        yield server
