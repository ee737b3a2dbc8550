"""Test scaffolding shared by tests/ and benchmarks/ (not part of the wheel).

``from tests.helpers import build_gallery, free_port, ...``: galleries indexed with the tiny
model (:mod:`.gallery`), the gRPC server started on one (:mod:`.serving`), crafted images
(:mod:`.images`), ports and certificates (:mod:`.net`).
"""

from tests.helpers.gallery import (
    CATEGORIES,
    FIELDS,
    SHAPES_FIELDS,
    Gallery,
    add_version,
    build_gallery,
    build_shapes_gallery,
)
from tests.helpers.images import (
    COLORS,
    SHAPES,
    bad_inputs,
    draw,
    jpeg_b64,
    png,
    png_bomb,
    png_header_only,
    random_image,
    render_images,
    write_images,
)
from tests.helpers.net import free_port, self_signed_cert
from tests.helpers.serving import (
    CHROMIUM,
    CHROMIUM_ARGS,
    INDEX_NAME,
    MODEL,
    server_kwargs,
    start_server,
)

__all__ = [
    "CATEGORIES",
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "COLORS",
    "FIELDS",
    "INDEX_NAME",
    "MODEL",
    "SHAPES",
    "SHAPES_FIELDS",
    "Gallery",
    "add_version",
    "bad_inputs",
    "build_gallery",
    "build_shapes_gallery",
    "draw",
    "free_port",
    "jpeg_b64",
    "png",
    "png_bomb",
    "png_header_only",
    "random_image",
    "render_images",
    "self_signed_cert",
    "server_kwargs",
    "start_server",
    "write_images",
]
