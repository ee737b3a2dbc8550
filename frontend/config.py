"""UI settings: where the gRPC server is and how to talk to it.

``cir ui`` puts its flags into the environment of the ``streamlit run`` child; the app script
reads them back here (Streamlit gives a script no argv of its own).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

ENV_SERVER = "CIR_UI_SERVER"
ENV_API_KEY = "CIR_UI_API_KEY"
ENV_TIMEOUT = "CIR_UI_TIMEOUT"
ENV_TLS_CA = "CIR_UI_TLS_CA"
ENV_MAX_UPLOAD_MB = "CIR_UI_MAX_UPLOAD_MB"

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 10.0
#: What the UI assumes when the server's limit is unknown: the server's own default.
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class UISettings:
    """What the app needs to reach the server (immutable: it keys the cached client)."""

    server: str = DEFAULT_SERVER  # gRPC target "host:port"
    api_key: str | None = None  # sent as x-api-key when set
    timeout: float = DEFAULT_TIMEOUT_S  # per-call deadline in seconds
    tls_ca: str | None = None  # PEM file of the CA for a TLS server (None: plaintext)
    # a cap below the server's max_image_bytes (None: the server's limit is the one limit)
    max_upload_bytes: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> UISettings:
        """Read ``CIR_UI_*``; a malformed number falls back to the default (logged), never raises."""
        env = os.environ if env is None else env
        timeout = _float(env.get(ENV_TIMEOUT), DEFAULT_TIMEOUT_S, ENV_TIMEOUT)
        max_mb = _float(env.get(ENV_MAX_UPLOAD_MB), 0.0, ENV_MAX_UPLOAD_MB)
        return cls(
            server=(env.get(ENV_SERVER) or DEFAULT_SERVER).strip(),
            api_key=env.get(ENV_API_KEY) or None,
            timeout=timeout if timeout > 0 else DEFAULT_TIMEOUT_S,
            tls_ca=env.get(ENV_TLS_CA) or None,
            max_upload_bytes=int(max_mb * 2**20) if max_mb > 0 else None,
        )

    def to_env(self) -> dict[str, str]:
        """The environment variables that make ``from_env`` return these settings."""
        env = {ENV_SERVER: self.server, ENV_TIMEOUT: str(self.timeout)}
        if self.max_upload_bytes:
            env[ENV_MAX_UPLOAD_MB] = str(self.max_upload_bytes / 2**20)
        if self.api_key:
            env[ENV_API_KEY] = self.api_key
        if self.tls_ca:
            env[ENV_TLS_CA] = self.tls_ca
        return env


def _float(raw: str | None, default: float, name: str) -> float:
    if raw is None or not raw.strip():
        return default
    try:
        return float(raw)
    except ValueError:
        logger.warning("%s=%r is not a number; using %s", name, raw, default)
        return default
