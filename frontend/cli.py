"""``cir ui``: start the Streamlit search page as a client of a running gRPC server.

The flags become ``CIR_UI_*`` environment variables of a ``streamlit run frontend/app.py``
child process (Streamlit gives the script no argv of its own); SIGINT/SIGTERM are forwarded so
Ctrl-C and service managers stop the child cleanly. Nothing here imports streamlit or torch.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

import typer

from frontend.config import DEFAULT_SERVER, DEFAULT_TIMEOUT_S, UISettings

logger = logging.getLogger(__name__)

APP_PATH = Path(__file__).with_name("app.py")


def streamlit_command(
    host: str, port: int, python: str | None = None, max_upload_mb: int | None = None
) -> list[str]:
    """The ``streamlit run`` command line for the app (headless, no telemetry).

    ``max_upload_mb``: Streamlit's own upload cap (``server.maxUploadSize``, in its MB of
    2**20 bytes), set to the UI's one limit so the uploader's chip and the page agree.
    """
    upload = ["--server.maxUploadSize", str(max_upload_mb)] if max_upload_mb else []
    return [
        python or sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_PATH),
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--server.address",
        host,
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",  # no "Deploy" button for the people searching
        "--server.fileWatcherType",
        "none",  # no reloader threads polling the tree in production
        *upload,
    ]


def upload_limit_mb(settings: UISettings, probe_timeout: float = 3.0) -> int:
    """The uploader's cap for ``server.maxUploadSize``: the server's ``max_image_bytes`` from
    ``Info`` (lowered by ``--max-upload-mb``), or the server's default when it cannot be asked
    now (the page re-reads ``Info`` and sets each uploader's own cap from it)."""
    from frontend.state import upload_limit

    server_bytes = 0
    try:
        from server.client import CIRClient

        with CIRClient(
            settings.server,
            api_key=settings.api_key,
            tls_ca=settings.tls_ca,
            timeout=min(probe_timeout, settings.timeout),
            retries=0,
        ) as client:
            server_bytes = int(client.info().limits.max_image_bytes)
    except Exception as exc:  # noqa: BLE001 - the page reports a down server itself
        logger.info("server %s not reachable for its upload limit (%s)", settings.server, exc)
    return max(1, math.ceil(upload_limit(server_bytes, settings.max_upload_bytes) / 2**20))


def run_streamlit(settings: UISettings, host: str, port: int) -> int:
    """Run the app in a child process until it exits; returns its exit code."""
    env = {**os.environ, **settings.to_env()}
    # The app imports `frontend.*`: make the repository importable whatever the cwd is.
    root = str(APP_PATH.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    cmd = streamlit_command(host, port, max_upload_mb=upload_limit_mb(settings))
    logger.info("starting the UI on http://%s:%d (server %s)", host, port, settings.server)
    child = subprocess.Popen(cmd, env=env)

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # a second Ctrl-C while the child shuts down
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ui(
    server: str = typer.Option(
        DEFAULT_SERVER, "--server", envvar="CIR_UI_SERVER", help="gRPC server HOST:PORT"
    ),
    port: int = typer.Option(8501, "--port", min=1, max=65535, help="port of the web page"),
    host: str = typer.Option("127.0.0.1", "--host", help="address the web page binds"),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="CIR_UI_API_KEY", help="API key for the server (x-api-key)"
    ),
    timeout: float = typer.Option(
        DEFAULT_TIMEOUT_S,
        "--timeout",
        envvar="CIR_UI_TIMEOUT",
        min=0.1,
        help="per-call deadline in seconds",
    ),
    tls_ca: Path | None = typer.Option(
        None, "--tls-ca", exists=True, dir_okay=False, help="CA PEM of a TLS server"
    ),
    max_upload_mb: float | None = typer.Option(
        None,
        "--max-upload-mb",
        min=0.1,
        help="largest upload, below the server's max_image_bytes (default: the server's limit)",
    ),
) -> None:
    """Run the Streamlit search UI (a client of `cir serve`; it never loads the model)."""
    if ":" not in server.strip().rsplit("]", 1)[-1]:
        raise typer.BadParameter(f"expected HOST:PORT, got {server!r}", param_hint="--server")
    settings = UISettings(
        server=server.strip(),
        api_key=api_key or None,
        timeout=timeout,
        tls_ca=str(tls_ca) if tls_ca else None,
        max_upload_bytes=int(max_upload_mb * 2**20) if max_upload_mb else None,
    )
    code = run_streamlit(settings, host, port)
    if code not in (0, -signal.SIGINT, -signal.SIGTERM):
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``cir ui`` to the root command."""
    app.command("ui")(ui)


def main() -> None:
    """``python -m frontend.cli``: the ``ui`` command on its own (no root CLI needed)."""
    standalone = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    standalone.command()(ui)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    standalone()


if __name__ == "__main__":
    main()
