"""The committed stubs in server/_generated match what protoc makes from proto/ now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_up_to_date() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "server.gen_proto", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_generated_package_imports() -> None:
    from server._generated.cir.v1 import search_pb2, search_pb2_grpc

    assert search_pb2.DESCRIPTOR.package == "cir.v1"
    names = set(search_pb2.DESCRIPTOR.services_by_name["SearchService"].methods_by_name)
    assert names == {
        "Search",
        "SearchBatch",
        "GetImage",
        "Info",
        "EncodeQuery",
        "ListImages",
        "Explain",
    }
    assert hasattr(search_pb2_grpc, "SearchServiceStub")


def test_check_detects_a_difference(tmp_path: Path) -> None:
    from server import gen_proto

    gen_proto.generate(tmp_path)
    assert gen_proto.check(tmp_path) == []
    stub = tmp_path / "cir" / "v1" / "search_pb2.py"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    assert any("edited by hand" in line for line in gen_proto.check(tmp_path))
