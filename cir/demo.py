"""`cir demo`: from a fresh checkout to a running engine in one command.

1. generates the synthetic shapes world (the demo model's recipe, seed 0) unless present;
2. builds the embedded Qdrant Edge index of its gallery with the committed demo model, unless an
   active, verified version made by the same encoder is already there;
3. starts the gRPC server and the Streamlit UI as child processes, waits until both answer,
   prints their addresses; Ctrl-C (or SIGTERM) stops all of it cleanly.

Stopping is robust to how it was started: the SIGINT/SIGTERM handlers are installed explicitly
(a process started with SIGINT ignored, by ``nohup`` or ``&`` in a script, would otherwise never
see Ctrl-C), and every child runs in a process group of its own with ``PR_SET_PDEATHSIG`` (Linux):
if ``cir demo`` itself is killed, even with SIGKILL, its children get SIGTERM and stop, and a
normal stop sweeps each child's group (the UI's streamlit, the server's search process).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import typer

from retrieval.index.api import DEFAULT_URI

logger = logging.getLogger(__name__)

DEMO_MODEL = "models/sprc-shapes"
DEMO_DATA = "data/shapes"
DEMO_INDEX = DEFAULT_URI
DEMO_NAME = "gallery"
STARTUP_TIMEOUT_S = 600.0  # longest wait for the server / the UI to answer
DEMO_FIELDS = ("n_objects:integer", "source:keyword")


@dataclass
class DemoConfig:
    data: Path = Path(DEMO_DATA)  # synthetic world (generated when gallery.jsonl is absent)
    model: str = DEMO_MODEL  # encoder checkpoint folder
    index: str = DEMO_INDEX  # index URI
    name: str = DEMO_NAME  # index name
    host: str = "127.0.0.1"  # bind address of server and UI
    grpc_port: int = 50051  # gRPC server port
    ui_port: int = 8501  # Streamlit port
    metrics_port: int = 0  # Prometheus port of the server (0: off)
    ui: bool = True  # start the Streamlit UI too
    seed: int = 0  # world seed (the demo model's recipe)
    reranker: str | None = None  # re-ranker folder (None: MODEL/reranker when present)
    rerank: int | None = None  # the server's default rerank_k (None: its own; 0: off)


def _cir(*args: str) -> list[str]:
    return [sys.executable, "-m", "cir.cli", *args]


#: Run as ``python -c LAUNCHER PARENT_PID CMD...``: ask Linux for SIGTERM when the parent dies
#: (prctl PR_SET_PDEATHSIG, kept across execve), then become CMD. A launcher rather than a
#: ``preexec_fn``: Python code between fork and exec is unsafe in a process with threads (gRPC's,
#: after the health checks), and without it subprocess can use vfork/posix_spawn.
_PDEATHSIG_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(143)  # the parent died before prctl: do not start an orphan\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def spawn(cmd: list[str]) -> subprocess.Popen[bytes]:
    """Start a child that dies with this process: a process group of its own (so that a stop
    reaches its own children too) and, on Linux, SIGTERM when this process dies, even by SIGKILL.
    ``cmd[0]`` must be an absolute path (``sys.executable``)."""
    if sys.platform.startswith("linux"):
        cmd = [sys.executable, "-c", _PDEATHSIG_LAUNCHER, str(os.getpid()), *cmd]
    return subprocess.Popen(cmd, process_group=0)


def run_child(cmd: list[str]) -> None:
    """``subprocess.run(cmd, check=True)`` with a child started by ``spawn``; stopped (SIGTERM,
    then SIGKILL) when this process is interrupted."""
    proc = spawn(cmd)
    try:
        code = proc.wait()
    except BaseException:
        stop_all([proc])
        raise
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd)


class StopSignals:
    """SIGINT and SIGTERM handlers for the demo's lifetime, installed explicitly: a process
    started with SIGINT ignored (``nohup``, ``&`` in a non-interactive shell) gets no
    KeyboardInterrupt from Python otherwise. The first signal sets ``stopping`` and raises
    KeyboardInterrupt in the main thread (whatever it waits for: a build, a health check);
    later ones only set the flag, so that the orderly stop is not interrupted."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.stopping = False
        self.signum: int | None = None
        self._old = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            return
        self.stopping, self.signum = True, signum
        raise KeyboardInterrupt

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def ensure_world(data: Path, seed: int = 0) -> None:
    if (data / "gallery.jsonl").is_file() and (data / "test.jsonl").is_file():
        logger.info("world present at %s", data)
        return
    typer.echo(f"[demo] generating the synthetic shapes world into {data} (about a minute) ...")
    run_child(_cir("data", "shapes", "--out", str(data), "--seed", str(seed), "--overwrite"))


def write_manifest(data: Path, out: Path) -> Path:
    """gallery.jsonl -> an indexer manifest: absolute path + metadata columns as payload."""
    from retrieval.data.triplets import load_gallery, resolve_path

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as fh:
        for item in load_gallery(data):
            row: dict[str, str | int | float | bool] = {
                "path": str(resolve_path(data, item.path).resolve()),  # manifest-relative otherwise
                "gallery_id": item.id,
            }
            row.update(
                {k: v for k, v in item.metadata.items() if isinstance(v, (str, int, float, bool))}
            )
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, out)
    return out


#: The demo images' own ids (`cir search --id g001058`): the manifest's gallery_id column.
DEMO_ID_COLUMN = "gallery_id"


def index_is_current(
    index: str, name: str, fingerprint: str, expected: int, patches: bool = False
) -> bool:
    """An active version built by this encoder with every gallery image in it, known by the
    gallery ids (an index built before user ids existed is rebuilt), with the re-ranker's ViT
    tokens when ``patches`` (an index built before the model had its re-ranker is rebuilt)."""
    from retrieval.index import GalleryIndexError, IndexInUseError, open_index

    try:
        idx = open_index(index, name=name, encoder_fingerprint=fingerprint)
    except IndexInUseError:
        raise
    except GalleryIndexError as exc:
        logger.info("index not reusable: %s", exc)
        return False
    try:
        meta = idx.meta
        ids = meta.extra.get("user_ids") if meta is not None else None
        current = (
            idx.active_version is not None
            and idx.count() == expected
            and ids == f"column:{DEMO_ID_COLUMN}"
        )
        if current and patches:  # the model's re-ranker reads ViT tokens stored per point
            from retrieval.index.api import PATCHES_KEY

            sample = idx.sample(1, with_payload=[PATCHES_KEY])
            current = bool(sample) and PATCHES_KEY in sample[0].payload
        return current
    finally:
        idx.close()


def ensure_index(cfg: DemoConfig) -> None:
    from retrieval.data.triplets import load_gallery
    from retrieval.encoder import Encoder

    expected = len(load_gallery(cfg.data))
    from retrieval.rerank import stores_patches

    fingerprint = Encoder.from_pretrained(cfg.model).fingerprint  # loaded once, for the guard
    patches = stores_patches(cfg.model, fingerprint)
    if index_is_current(cfg.index, cfg.name, fingerprint, expected, patches):
        typer.echo(f"[demo] reusing index {cfg.index} ({cfg.name}): {expected} images")
        return
    manifest = write_manifest(cfg.data, cfg.data / "demo_manifest.jsonl")
    typer.echo(f"[demo] indexing {expected} gallery images into {cfg.index} ({cfg.name}) ...")
    args = [
        "index",
        "build",
        str(manifest),
        "--index",
        cfg.index,
        "--name",
        cfg.name,
        "--model",
        cfg.model,
        "--id-column",
        DEMO_ID_COLUMN,
    ]
    for f in DEMO_FIELDS:
        args += ["--field", f]
    report = cfg.data / "demo_index_report.json"
    run_child(_cir(*args, "--report", str(report)))
    if not index_is_current(cfg.index, cfg.name, fingerprint, expected, patches):
        raise RuntimeError(
            f"indexing did not produce an active index of {expected} images: see {report}"
        )


def wait_grpc(target: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the gRPC server exited with code {proc.returncode}")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"the gRPC server at {target} was not SERVING after {timeout:.0f} s")


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the UI exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the UI at {url} did not answer after {timeout:.0f} s")


def stop_all(procs: list[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM each child (an orderly stop: the server drains, the UI stops streamlit), SIGKILL
    what is still there after ``grace`` seconds, then sweep each child's process group (spawned
    children lead one) so that no grandchild outlives the demo."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)  # leftovers of its group; the leader has exited


def run_demo(cfg: DemoConfig) -> None:
    if not Path(cfg.model, "config.json").is_file():
        raise typer.BadParameter(
            f"demo model not found at {cfg.model} (it is committed in the repository)"
        )
    from retrieval.index import IndexInUseError

    signals = StopSignals()  # first: generating and indexing take minutes
    procs: list[subprocess.Popen[bytes]] = []
    try:
        try:
            ensure_world(cfg.data, cfg.seed)
            ensure_index(cfg)
        except IndexInUseError as exc:
            typer.echo(
                f"[demo] {exc}: is another `cir demo` or `cir serve` using {cfg.index}?", err=True
            )
            raise typer.Exit(code=1) from exc
        except subprocess.CalledProcessError as exc:  # the step printed why on stderr
            typer.echo(f"[demo] `{' '.join(exc.cmd[3:5])}` exited with {exc.returncode}", err=True)
            raise typer.Exit(code=1) from exc
        target = f"{cfg.host}:{cfg.grpc_port}"
        server = spawn(
            _cir(
                "serve",
                "--model",
                cfg.model,
                "--index",
                cfg.index,
                "--name",
                cfg.name,
                "--host",
                cfg.host,
                "--port",
                str(cfg.grpc_port),
                "--metrics-port",
                str(cfg.metrics_port),
                *(["--reranker", cfg.reranker] if cfg.reranker else []),
                *(["--rerank", str(cfg.rerank)] if cfg.rerank is not None else []),
            )
        )
        procs.append(server)
        # generous: a busy machine can take minutes to load; a child that dies ends the wait
        wait_grpc(target, STARTUP_TIMEOUT_S, server)
        typer.echo(
            f"[demo] gRPC server   {target}   (try: cir search --server {target} --id ... --text ...)"
        )
        if cfg.ui:
            ui = spawn(
                _cir("ui", "--server", target, "--host", cfg.host, "--port", str(cfg.ui_port))
            )
            procs.append(ui)
            wait_http(f"http://{cfg.host}:{cfg.ui_port}/", STARTUP_TIMEOUT_S, ui)
            typer.echo(f"[demo] search UI     http://{cfg.host}:{cfg.ui_port}/")
        typer.echo("[demo] running; press Ctrl-C to stop")
        while not signals.stopping and all(p.poll() is None for p in procs):
            time.sleep(0.5)
        for p in procs:
            if p.poll() is not None and not signals.stopping:
                typer.echo(
                    f"[demo] a child process exited with code {p.returncode}; stopping", err=True
                )
    except KeyboardInterrupt:
        pass
    finally:
        signals.stopping = True  # a signal from here on must not interrupt the stop
        typer.echo("[demo] stopping ...")
        stop_all(procs)
        signals.restore()
        typer.echo("[demo] stopped")


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        data: Path = typer.Option(
            Path(DEMO_DATA), "--data", help="Synthetic world dir (generated if absent)."
        ),
        model: str = typer.Option(DEMO_MODEL, "--model", help="Encoder checkpoint folder."),
        index: str = typer.Option(DEMO_INDEX, "--index", help="Index URI."),
        name: str = typer.Option(DEMO_NAME, "--name", help="Index name."),
        host: str = typer.Option("127.0.0.1", "--host", help="Bind address of server and UI."),
        grpc_port: int = typer.Option(50051, "--grpc-port", help="gRPC port."),
        ui_port: int = typer.Option(8501, "--ui-port", help="Web UI port."),
        metrics_port: int = typer.Option(0, "--metrics-port", help="Prometheus port (0: off)."),
        no_ui: bool = typer.Option(False, "--no-ui", help="Start only the gRPC server."),
        reranker: str | None = typer.Option(
            None, "--reranker", help="Re-ranker folder (default: MODEL/reranker when present)."
        ),
        rerank: int | None = typer.Option(
            None,
            "--rerank",
            min=0,
            help="Candidates the server re-ranks by default (0: the first stage alone).",
        ),
    ) -> None:
        """Generate the demo gallery, index it, start the gRPC server and the web UI."""
        # Once the demo has stopped, this process only exits. The interpreter's shutdown can
        # hang on a library's thread (gRPC's or torch's pool; seen in 2 of ~12 stops on a loaded
        # machine), so a clean stop ends the process at once with os._exit after flushing;
        # anything else still gets the watchdog: every thread's stack after 30 s, exit 1.
        try:
            run_demo(
                DemoConfig(
                    data=data,
                    model=model,
                    index=index,
                    name=name,
                    host=host,
                    grpc_port=grpc_port,
                    ui_port=ui_port,
                    metrics_port=metrics_port,
                    ui=not no_ui,
                    reranker=reranker,
                    rerank=rerank,
                )
            )
        except BaseException:
            faulthandler.dump_traceback_later(30, exit=True)
            raise
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # stopped cleanly: children gone, nothing left to run or flush
