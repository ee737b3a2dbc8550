"""Issue 17 for `cir serve`: a random-weight preset is refused unless --allow-untrained (from a
flag or CIR_MODEL alike), and GetImage, called once per image shown, is access-logged at DEBUG
while searches stay at INFO."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.client import CIRClient, CIRError
from tests.helpers import build_shapes_gallery, start_server

CIR = [sys.executable, "-m", "cir.cli"]


def test_serve_refuses_random_weight_presets(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIR_")}
    for args, extra_env in [
        (["--model", "tiny"], {}),
        (["--model", "sprc-small"], {}),
        ([], {"CIR_MODEL": "blip2-vitg"}),  # chosen by the environment, not a flag
    ]:
        res = subprocess.run(
            [*CIR, "serve", *args, "--index", f"edge:{tmp_path / 'none'}", "--port", "0"],
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 2, (args, res.stderr[-2000:])
        assert "RANDOM weights" in res.stderr and "--allow-untrained" in res.stderr
        assert "Traceback" not in res.stderr
    # with the flag it loads the model and goes on to open the index (none here: it stops)
    res = subprocess.run(
        [*CIR, "serve", "--model", "tiny", "--allow-untrained", "--index",
         f"edge:{tmp_path / 'none'}", "--port", "0", "--metrics-port", "0"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode != 0 and "RANDOM weights" not in res.stderr
    assert "loading model and index" in res.stderr, res.stderr[-2000:]  # the model loaded
    assert "has no active version" in res.stderr, res.stderr[-2000:]


def test_get_image_is_logged_at_debug_searches_at_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gallery = build_shapes_gallery(tmp_path, n=6)
    srv = start_server(gallery)
    try:
        caplog.set_level(logging.DEBUG, logger="server.access")
        with CIRClient(srv.target, timeout=30) as client:
            client.search("a red disc", reference_id=gallery.ids[0], top_k=3)
            for i in gallery.ids[:4]:
                client.get_image(i)
            with pytest.raises(CIRError):
                client.get_image("no-such-image")
    finally:
        srv.stop()
    recs = [(r.getMessage().split()[0], r.getMessage().split()[1], r.levelno) for r in caplog.records
            if r.name == "server.access"]  # fmt: skip
    assert ("Search", "OK", logging.INFO) in recs, recs
    images = [r for r in recs if r[0] == "GetImage"]
    assert [lv for _, code, lv in images if code == "OK"] == [logging.DEBUG] * 4, recs
    assert [lv for _, code, lv in images if code != "OK"] == [logging.WARNING], recs
