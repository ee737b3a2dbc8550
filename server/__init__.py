"""The gRPC search server (``cir serve``), its typed client (``server.client``) and the API.

The API is ``proto/cir/v1/search.proto``; stubs are generated into ``server/_generated`` by
``python -m server.gen_proto``. See docs/api.md.
"""

from __future__ import annotations

__version__ = "0.1.0"
