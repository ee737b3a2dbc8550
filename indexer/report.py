"""The run report (``--report OUT.json``) and the final summary printed by ``cir index build``."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class Report:
    """Everything a build did. ``to_json`` keys are a contract (docs/indexer.md)."""

    index: str = ""  # index URI
    name: str = ""  # index name
    version: str | None = None  # version written into
    mode: str = "rebuild"  # "rebuild" | "resume" | "incremental"
    shard: str = "0/1"  # i/n
    source: str = ""  # folder or manifest
    preset: str = ""  # encoder preset
    model: str = ""  # the weights used: checkpoint folder, or "preset X (random weights)"
    untrained: bool = False  # random-weight preset (allowed with --allow-untrained)
    encoder_fingerprint: str = ""
    device: str = ""
    dtype: str = ""
    total: int = 0  # items of the collection in this shard (after --limit)
    indexed: int = 0  # images encoded and written by this run
    already_present: int = 0  # in the version already (resume / incremental: unchanged)
    duplicates: int = 0  # same content as an earlier item of this run: indexed once
    duplicate_files: list[dict[str, str]] = field(default_factory=list)  # [{path, same_as}]
    moved: int = 0  # incremental: known content under a new path (payload updated)
    deleted: int = 0  # incremental: ids removed (file vanished or changed)
    skipped: list[dict[str, str]] = field(default_factory=list)  # [{path, reason, detail}]
    ignored_files: int = 0  # folder input: files with other extensions
    ignored_paths: list[str] = field(default_factory=list)  # their relative paths
    warnings: list[str] = field(default_factory=list)  # metadata that did not convert, ...
    count: int | None = None  # points in the version at the end
    verified: bool | None = None  # None: not verified (sharded / --no-verify)
    verification: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None  # fast-mode L measured on this version
    activated: bool = False
    # why the run did not activate / delete (empty, or shrinks beyond --max-shrink); exit 2
    refused: str | None = None
    dry_run: bool = False  # --dry-run: nothing was written
    # --dry-run: {add, change, delete, skip, unchanged, encode, count_before, count_after,
    # active_version}
    plan: dict[str, Any] | None = None
    seconds: float = 0.0  # wall time of the run (model load included)
    images_per_s: float = 0.0  # items processed (indexed + present + duplicates) / pipeline time
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(s["reason"] for s in self.skipped).items()))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped_count"] = len(self.skipped)
        d["skipped_by_reason"] = self.skipped_by_reason
        d["stage_seconds"] = {k: round(v, 4) for k, v in self.stage_seconds.items()}
        d["seconds"] = round(self.seconds, 4)
        d["images_per_s"] = round(self.images_per_s, 3)
        return d

    def write(self, path: Path) -> None:
        write_json_atomic(Path(path), self.to_json())


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def render_summary(report: Report) -> None:
    """A rich table on stderr (stdout stays clean for --json style consumers)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    title = f"cir index build: {report.name} {report.version or ''}"
    if report.dry_run:
        title += " (dry run: nothing written)"
    t = Table(title=title, show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    model = report.model or report.preset
    if not report.untrained:
        model += f" ({report.preset})"  # else model says "preset NAME (random weights)"
    model += f" on {report.device} {report.dtype}"
    rows: list[tuple[str, Any]] = [
        ("mode", f"{report.mode} (shard {report.shard})"),
        ("model", model),
        ("items", report.total),
        ("indexed", report.indexed),
        ("already present", report.already_present),
        ("duplicates", report.duplicates),
        ("skipped", f"{len(report.skipped)} {report.skipped_by_reason or ''}"),
    ]
    if report.mode == "incremental":
        rows += [("deleted", report.deleted), ("moved", report.moved)]
    rows += [
        ("points in version", report.count),
        ("verified", report.verified),
        ("fast L (calibrated)", _calibration_summary(report.calibration)),
        ("activated", report.activated),
        ("seconds", f"{report.seconds:.2f}"),
        ("images/s", f"{report.images_per_s:.1f}"),
        ("stages (s)", ", ".join(f"{k}={v:.2f}" for k, v in report.stage_seconds.items())),
    ]
    if report.dry_run and report.plan is not None:
        rows = (
            rows[:2]
            + [("items", report.total)]
            + [
                ("plan: " + k, "unknown (the active version is in use)" if v is None else v)
                for k, v in report.plan.items()
            ]
        )
    if report.ignored_files:
        shown = ", ".join(report.ignored_paths[:5])
        more = report.ignored_files - min(5, len(report.ignored_paths))
        rows.append(
            (
                "ignored files",
                f"{report.ignored_files}: {shown}" + (f" (+{more})" if more > 0 else ""),
            )
        )
    for k, v in rows:
        t.add_row(k, str(v))
    console.print(t)
    for s in report.skipped[:20]:
        console.print(f"  skipped {s['path']}: {s['reason']} {s.get('detail', '')}"[:200])
    if len(report.skipped) > 20:
        console.print(f"  ... {len(report.skipped) - 20} more in the report")


def _calibration_summary(cal: dict[str, Any] | None) -> str:
    if not cal:
        return "-"
    curve = cal.get("curve", {})
    at = cal.get("heldout_recall")  # on the queries L was not chosen with
    at = at if at is not None else curve.get(str(cal.get("L")))
    got = f" (held-out recall@{cal.get('top_k')} {at:.3f})" if at is not None else ""
    src = f"; {cal.get('source', 'proxy')} queries"
    if cal.get("L") is None:
        return f"none for >= {cal.get('recall_target')}: fast searches exactly{src}"
    return f"{cal.get('L')} for >= {cal.get('recall_target')}{got}{src}"
