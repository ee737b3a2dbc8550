"""`cir serve` as a real process: SIGTERM drains in-flight requests; `cir search`; the model
guard refuses to start on a fingerprint mismatch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from server.client import CIRClient
from server.testing import build_gallery, free_port

torch = pytest.importorskip("torch")

CIR = [sys.executable, "-c", "from retrieval.cli import main; main()"]


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


def test_serve_sigterm_drains_in_flight(tmp_path: Path, encoder: Any) -> None:
    uri, ids = build_gallery(tmp_path, encoder, 12)
    port = free_port()
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
        "0",
        "--max-wait-ms",
        "400",
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
            c.wait_ready(60)
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
                time.sleep(0.15)  # they now wait for their batch (400 ms)
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
