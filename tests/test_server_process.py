"""`cir serve` as a real process: SIGTERM drains in-flight requests; `cir search`; the model
guard refuses to start on a fingerprint mismatch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from server.client import CIRClient
from tests.helpers import build_gallery, free_port

torch = pytest.importorskip("torch")

CIR = [sys.executable, "-c", "from cir.cli import main; main()"]


@pytest.fixture(scope="module")
def encoder() -> Any:
    from retrieval.encoder import Encoder

    torch.set_num_threads(1)
    return Encoder.from_pretrained("tiny")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["CIR_NUM_THREADS"] = "1"
    env.pop("CIR_API_KEY", None)
    return env


def _inflight(metrics_port: int) -> float:
    """The server's cir_inflight_requests gauge (RPCs being handled)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("cir_inflight_requests")
    )


def test_serve_sigterm_drains_in_flight(tmp_path: Path, encoder: Any) -> None:
    uri, ids = build_gallery(tmp_path, encoder, 12)
    port, metrics_port = free_port(), free_port()
    cmd = [
        *CIR,
        "serve",
        "--model",
        "tiny",
        "--allow-untrained",
        "--index",
        uri,
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        # the 6 queries below wait for their batch long enough to be caught in flight however
        # busy the machine is (a lone query is not sent at once either)
        "--max-wait-ms",
        "5000",
        "--no-adaptive-wait",
        "--max-batch",
        "64",
        "--log-format",
        "json",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )
    try:
        with CIRClient(f"127.0.0.1:{port}", timeout=20, retries=0) as c:
            c.wait_ready(600)  # loading takes a minute on a busy machine
            out = subprocess.run(
                [*CIR, "search", "--server", f"127.0.0.1:{port}", "--id", ids[1], "--text",
                 "make it red", "--top-k", "3", "--json"],
                capture_output=True, text=True, env=_env(), timeout=60,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            data = json.loads(out.stdout)
            assert len(data["results"]) == 3 and data["results"][0]["rank"] == 1
            bad = subprocess.run(
                [*CIR, "search", "--server", f"127.0.0.1:{port}", "--id", "nope", "--text", "x"],
                capture_output=True, text=True, env=_env(), timeout=60,
            )  # fmt: skip
            assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr
            with ThreadPoolExecutor(6) as pool:
                futs = [pool.submit(c.search, f"q{i}", None, ids[i], 2) for i in range(6)]
                deadline = time.monotonic() + 60
                while _inflight(metrics_port) < 6 and time.monotonic() < deadline:
                    time.sleep(0.05)  # until all 6 wait for their batch (behaviour, not timing)
                assert _inflight(metrics_port) >= 6
                proc.send_signal(signal.SIGTERM)
                results = [f.result(20) for f in futs]
            assert all(len(r.results) == 2 for r in results)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    access = [x for x in lines if x.get("logger") == "server.access"]
    assert access and all(x.get("request_id") for x in access)
    assert any("draining" in x["msg"] for x in lines)


def test_serve_refuses_other_model(tmp_path: Path, encoder: Any) -> None:
    from retrieval.encoder import Encoder

    uri, _ = build_gallery(tmp_path / "g", encoder, 6)
    other = Encoder.from_pretrained("tiny", seed=1).save_pretrained(tmp_path / "other-model")
    proc = subprocess.run(
        [*CIR, "serve", "--model", str(other), "--index", uri, "--port", str(free_port()),
         "--metrics-port", "0", "--log-format", "text"],
        capture_output=True, text=True, env=_env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "refusing to start" in proc.stderr and "another encoder" in proc.stderr
