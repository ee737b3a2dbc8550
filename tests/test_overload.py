"""Issue 23: under overload and faults `cir serve` keeps serving at capacity and answers with the
documented codes; a resumed build never activates a version without its indexes.

One soak against a real `cir serve` on 127.0.0.1 (tiny model, the index in its search
process), bounded in time: capacity measured in the run, then overload, 2,048 calls in flight,
callers that leave, search-process kills at random moments (also while a replacement opens the
index). It asserts codes and ratios measured in the same run, never absolute speeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import build_gallery, free_port, render_images

torch = pytest.importorskip("torch")
grpc = pytest.importorskip("grpc")

CIR = [sys.executable, "-c", "from cir.cli import main; main()"]
REPO = Path(__file__).resolve().parents[1]
#: what an overloaded server may answer a well-formed search (docs/api.md)
OVERLOAD_CODES = {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}


@pytest.fixture(scope="module")
def encoder() -> Any:
    from retrieval.encoder import Encoder

    torch.set_num_threads(1)
    return Encoder.from_pretrained("tiny")


# ----------------------------------------------------------------------------- unit: admission
def test_admission_before_work_and_retry_after_from_the_drain_rate() -> None:
    from server.batching import DeadlineUnmeetableError, Job, MicroBatcher, QueueFullError

    async def run() -> None:
        gate = asyncio.Event()

        async def process(batch: list[Job]) -> None:
            await gate.wait()
            await asyncio.sleep(0.2)  # 200 ms per batch of up to 4: 50 ms per query
            for j in batch:
                j.future.set_result(None)

        b = MicroBatcher(process, max_batch=4, max_wait_s=0.0, queue_size=100, max_queue_s=0.1)
        b.start()
        far = time.monotonic() + 30
        gate.set()
        await asyncio.gather(*b.submit(list(range(4)), far))  # measures the service rate
        assert 5 < b.service_rate <= 20.5  # 4 per 200 ms (or slower on a busy machine)
        gate.clear()
        first = b.submit(list(range(4)), far)  # dispatched, then held by the gate
        await asyncio.sleep(0.01)
        # admission holds room without queueing anything: a held ticket counts as queued
        t1 = b.admit(4, far)
        assert b.depth == 4
        futs = b.submit(list(range(4)), far, t1)
        t2 = b.admit(4, far)
        assert b.depth == 8 and b.expected_wait_s() == pytest.approx(8 / b.service_rate)
        # two batches queued: beyond them the estimated wait is bounded (0.1 s)
        with pytest.raises(QueueFullError) as err:
            b.admit(1, far)
        assert err.value.retry_after_ms == pytest.approx(1000 * 8 / b.service_rate, abs=2)
        # a caller whose deadline is shorter than the wait ahead is refused at once
        b.release(t2)
        b.release(t2)  # idempotent
        assert b.depth == 4
        with pytest.raises(QueueFullError):
            b.admit(1, time.monotonic() + 0.01)
        gate.set()
        await asyncio.gather(*first, *futs)
        # queued work that can no longer finish in time is not started: 100 ms left, a batch
        # takes 200 ms (the idle batcher dispatches it at once)
        late = b.submit([0], time.monotonic() + 0.1)
        with pytest.raises(DeadlineUnmeetableError):
            await late[0]
        assert b.dropped_expired == 1
        await b.stop()

    asyncio.run(run())


# ----------------------------------------------------------------------------- the soak
def _children(pid: int) -> list[psutil.Process]:
    out = []
    for c in psutil.Process(pid).children():
        try:
            if "retrieval.index.process" in " ".join(c.cmdline()):
                out.append(c)
        except psutil.Error:
            continue
    return out


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def _search(stub: Any, pb: Any, req: Any, timeout: float) -> tuple[str, float, float]:
    """(code, seconds from the send, retry-after-ms or 0)."""
    t0 = time.perf_counter()
    try:
        await stub.Search(req, timeout=timeout)
        return "OK", time.perf_counter() - t0, 0.0
    except grpc.aio.AioRpcError as exc:
        retry = [float(v) for k, v in (exc.trailing_metadata() or ()) if k == "retry-after-ms"]
        return exc.code().name, time.perf_counter() - t0, retry[0] if retry else 0.0


async def _closed_loop(stub: Any, pb: Any, reqs: list[Any], n: int, seconds: float) -> list[Any]:
    """``n`` clients, each sending its next query when the last returns (after the server's
    retry-after-ms, jittered, when refused: as CIRClient does)."""
    out: list[tuple[str, float, float]] = []
    end = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        rnd = random.Random(w)
        while time.perf_counter() < end:
            r = await _search(stub, pb, rnd.choice(reqs), 30.0)
            out.append(r)
            if r[2]:
                await asyncio.sleep(r[2] / 1000.0 * rnd.uniform(0.5, 1.5))

    await asyncio.gather(*(worker(w) for w in range(n)))
    return out


async def _open_loop(stub: Any, pb: Any, reqs: list[Any], rate: float, seconds: float) -> list[Any]:
    """Poisson arrivals at ``rate``/s with 2 s deadlines (no retries)."""
    out: list[tuple[str, float, float]] = []
    rnd = random.Random(1)
    tasks = set()
    end = time.perf_counter() + seconds
    nxt = time.perf_counter()

    async def one() -> None:
        out.append(await _search(stub, pb, rnd.choice(reqs), 2.0))

    while time.perf_counter() < end:
        while nxt <= time.perf_counter():
            t = asyncio.get_running_loop().create_task(one())
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            nxt += rnd.expovariate(rate)
        await asyncio.sleep(max(0.0, min(nxt - time.perf_counter(), 0.01)))
    await asyncio.wait(list(tasks), timeout=10)
    return out


def _p50(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else float("nan")


def test_soak_overload_and_faults(tmp_path: Path, encoder: Any) -> None:
    from retrieval.encoder import Encoder
    from server._generated.cir.v1 import search_pb2 as pb
    from server._generated.cir.v1 import search_pb2_grpc as pb_grpc
    from server.client import CIRClient

    # sprc-small, not tiny: its capacity (tens of queries/s on 2 cores) stays below what the
    # test's one Python client can offer (250/s), so "5x" is an overload on an idle machine too
    # (with tiny an idle machine served all of 150/s and nothing was refused)
    model = "sprc-small"
    uri, ids = build_gallery(tmp_path, Encoder.from_pretrained(model), 24)
    port, mport = free_port(), free_port()
    env = dict(os.environ, CIR_NUM_THREADS="1", CIR_ALLOW_UNTRAINED="1")
    env.pop("CIR_API_KEY", None)
    log = tmp_path / "serve.log"
    cmd = [
        *CIR, "serve", "--model", model, "--index", uri, "--port", str(port),
        "--metrics-port", str(mport), "--max-batch", "4", "--max-wait-ms", "2",
        "--refresh-interval-s", "0", "--log-format", "json",
        "--maximum-concurrent-rpcs", "256",
    ]  # fmt: skip
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    from io import BytesIO

    refs = []
    for im in render_images(6, seed=5):
        buf = BytesIO()
        im.save(buf, "PNG")
        refs.append(buf.getvalue())
    reqs = [
        pb.SearchRequest(reference_image=r, text=f"make it {c}", top_k=5, include_payload=False)
        for r, c in zip(refs, ["red", "blue", "big", "small", "green", "round"], strict=True)
    ]
    try:
        with CIRClient(f"127.0.0.1:{port}", timeout=20, retries=0) as c:
            c.wait_ready(120)

        async def soak() -> dict[str, Any]:
            res: dict[str, Any] = {}
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.SearchServiceStub(ch)
                await _closed_loop(stub, pb, reqs, 8, 1.0)  # warm-up
                t0 = time.perf_counter()
                cap = await _closed_loop(stub, pb, reqs, 32, 3.0)
                res["cap_s"] = time.perf_counter() - t0
                res["cap"] = cap
                rate = sum(1 for x in cap if x[0] == "OK") / res["cap_s"]
                res["rate"] = rate
                t0 = time.perf_counter()
                # 5x, up to what one Python client on a busy 2-core machine can send
                res["offered"] = min(5 * rate, 250.0)
                res["over"] = await _open_loop(stub, pb, reqs, res["offered"], 4.0)
                res["over_s"] = time.perf_counter() - t0
                # callers that leave: short deadlines under load, and cancellations
                bg = asyncio.ensure_future(_closed_loop(stub, pb, reqs, 32, 2.0))
                gone = []
                for i in range(40):  # admitted, then left while queued or encoding
                    call = stub.Search(reqs[i % len(reqs)], timeout=5.0)
                    gone.append(call)
                await asyncio.sleep(0.1)
                for call in gone:
                    call.cancel()
                for call in gone:
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                        await call
                await bg
            # 2,048 in flight at once on a fresh channel: beyond maximum_concurrent_rpcs
            # (256) gRPC answers RESOURCE_EXHAUSTED itself, never CANCELLED
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.SearchServiceStub(ch)
                text = pb.SearchRequest(text="a red one", top_k=3, include_payload=False)
                res["burst"] = await asyncio.gather(
                    *(_search(stub, pb, text, 20.0) for _ in range(2048))
                )
            return res

        res = asyncio.run(soak())
        cap_codes = Counter(x[0] for x in res["cap"])
        assert set(cap_codes) <= OVERLOAD_CODES, cap_codes
        cap_ok = [x[1] for x in res["cap"] if x[0] == "OK"]
        over = res["over"]
        codes = Counter(x[0] for x in over)
        assert set(codes) <= OVERLOAD_CODES, codes
        assert codes["RESOURCE_EXHAUSTED"] > 0, codes  # 5x: the excess is refused...
        assert all(x[2] for x in over if x[0] == "RESOURCE_EXHAUSTED")  # ...with retry-after
        goodput = codes["OK"] / res["over_s"]
        rejected = [x[1] for x in over if x[0] == "RESOURCE_EXHAUSTED"]
        admitted = [x[1] for x in over if x[0] == "OK"]
        figures = dict(rate=res["rate"], offered=res["offered"], goodput=goodput, codes=codes,
                       rejected_p50=_p50(rejected), admitted_p50=_p50(admitted),
                       cap_p50=_p50(cap_ok))  # fmt: skip
        print("soak:", figures)
        # still serving: a collapse (issue 23: 7-11 OK/s of 180) is far below this; the
        # latency targets are measured by benchmarks/overload.py (a CPU-starved test process
        # on a shared machine delays every call before the server sees it, answers and
        # refusals alike)
        assert goodput >= 0.3 * res["rate"], figures
        burst = Counter(x[0] for x in res["burst"])
        assert set(burst) <= OVERLOAD_CODES and burst["RESOURCE_EXHAUSTED"] > 0, burst
        assert burst["OK"] > 0, burst
        assert _metric(mport, "cir_client_gone_total") > 0

        # ---- search-process kills at random moments, also while a replacement opens
        server_pid = proc.pid
        stop = time.monotonic() + 60

        async def under_kills() -> list[Any]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.SearchServiceStub(ch)
                load = asyncio.ensure_future(_closed_loop(stub, pb, reqs, 6, 7.0))
                rnd = random.Random(3)
                kills = during_start = 0
                while not load.done() and time.monotonic() < stop and kills < 8:
                    await asyncio.sleep(rnd.uniform(0.05, 0.4))
                    for child in _children(server_pid):
                        child.kill()
                        kills += 1
                    if kills % 2 == 0:  # kill the replacement as soon as it exists
                        t_end = time.monotonic() + 3
                        while time.monotonic() < t_end:
                            fresh = _children(server_pid)
                            if fresh:
                                for child in fresh:
                                    child.kill()
                                during_start += 1
                                kills += 1
                                break
                            await asyncio.sleep(0.002)
                out = await load
                assert kills >= 4 and during_start >= 1, (kills, during_start)
                return out

        killed = asyncio.run(under_kills())
        kcodes = Counter(x[0] for x in killed)
        assert "INTERNAL" not in kcodes and "UNKNOWN" not in kcodes, kcodes
        assert set(kcodes) <= OVERLOAD_CODES | {"UNAVAILABLE"}, kcodes
        assert kcodes["UNAVAILABLE"] > 0 and kcodes["OK"] > 0, kcodes
        with CIRClient(f"127.0.0.1:{port}", timeout=20, retries=3) as c:
            assert c.health() == "SERVING"
            assert c.search("again", reference_id=ids[1], top_k=2).results  # recovered
            info = c.info()  # Info, ListImages read through the (new) child
            assert info.index.count == 24
            assert c.list_images(page_size=5)[2] == 24
        assert proc.poll() is None and psutil.pid_exists(server_pid)  # same server process
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    text = log.read_text()
    assert "ExecuteBatchError" not in text and "Traceback" not in text, text[-3000:]
    errors = [x for x in lines if x.get("level") == "ERROR"]
    # the only errors: the search process's deaths (each one restarted)
    assert all("search process exited" in x["msg"] for x in errors), errors[:5]


# ----------------------------------------------------------------------------- item 5
def _shard_info(index: Path, version: str) -> tuple[int, int, int]:
    import qdrant_edge

    shard = qdrant_edge.EdgeShard.load(str(index / "g" / "versions" / version / "shard"))
    try:
        i = shard.info()
        return int(i.points_count), int(i.segments_count), int(i.indexed_vectors_count)
    finally:
        shard.close()


KILL_BEFORE_FINISH = """
import os, runpy, signal, sys
from retrieval.index import edge

def die(self):  # every item written, the shard not optimized yet: SIGKILL, no cleanup
    os.kill(os.getpid(), signal.SIGKILL)

edge._Shard.finish = die
sys.argv = ["indexer", *sys.argv[1:]]
runpy.run_module("indexer", run_name="__main__")
"""


def test_resume_after_kill_before_finish_activates_an_optimized_version(tmp_path: Path) -> None:
    """SIGKILL after every item is written but before the shard is optimized: the resume
    writes nothing, yet the version it activates has the segments and indexed vectors of a
    clean build."""
    from tests.helpers import write_images

    src = tmp_path / "imgs"
    write_images(src, 400)
    env = dict(os.environ, OMP_NUM_THREADS="1", CIR_LOG_LEVEL="WARNING", CIR_ALLOW_UNTRAINED="1")
    base = [
        "build", str(src), "--name", "g", "--model", "tiny", "--allow-untrained",
        "--batch-size", "64", "--workers", "0", "--num-threads", "1", "--verify-sample", "8",
        "--no-progress", "--no-calibrate",
    ]  # fmt: skip

    def run(index: Path, *extra: str, script: str | None = None) -> subprocess.CompletedProcess:
        args = [*base, "--index", f"edge:{index}", *extra]
        pre = ["-c", script] if script else ["-m", "indexer"]
        return subprocess.run(
            [sys.executable, *pre, *args], cwd=REPO, env=env, timeout=300, capture_output=True
        )

    clean = run(tmp_path / "clean", "--report", str(tmp_path / "clean.json"))
    assert clean.returncode == 0, clean.stderr.decode()[-2000:]
    v_clean = json.loads((tmp_path / "clean.json").read_text())["version"]
    want = _shard_info(tmp_path / "clean", v_clean)
    assert want[0] == 400 and want[2] > 0  # a size at which the optimizer builds indexes

    ix = tmp_path / "ix"
    killed = run(ix, script=KILL_BEFORE_FINISH)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    (vdir,) = (ix / "g" / "versions").iterdir()
    assert not (vdir / "finished.json").exists()
    from retrieval.index import open_index

    idx = open_index(f"edge:{ix}", "g")
    try:
        assert idx.active_version is None  # nothing activated by the killed run
    finally:
        idx.close()

    resumed = run(ix, "--report", str(tmp_path / "resume.json"))
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    rep = json.loads((tmp_path / "resume.json").read_text())
    assert rep["mode"] == "resume" and rep["activated"] and rep["indexed"] == 0
    assert rep["version"] == vdir.name
    assert (vdir / "finished.json").exists()
    assert _shard_info(ix, rep["version"]) == want
