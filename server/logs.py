"""Structured logging for the server: JSON lines with the request id and call fields."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

#: RPCs whose successful calls are access-logged at DEBUG, not INFO: a results page fetches every
#: image it shows (270 GetImage calls a page), which would bury the searches in the log. Failed
#: calls keep their level; every call is still counted in the metrics (cir_requests_total).
QUIET_RPCS = frozenset({"GetImage"})


def access_level(method: str, level: int) -> int:
    """The access-log level of a call of ``method`` that would be logged at ``level``."""
    return logging.DEBUG if method in QUIET_RPCS and level == logging.INFO else level


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(fmt: str = "json", level: int | str = logging.INFO) -> None:
    """Route the root logger to stderr in ``fmt`` ("json" or "text")."""
    root = logging.getLogger()
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.INFO)
    root.setLevel(level)
