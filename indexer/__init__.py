"""The offline batch indexer: an image collection (folder or manifest) into the gallery index.

``cir index build|info|verify|versions|activate|drop-version`` (see docs/indexer.md);
programmatic use: ``indexer.pipeline.build(BuildConfig(...)) -> Report``.
"""

from __future__ import annotations

__all__ = ["ID_NAMESPACE", "image_id"]

from indexer.decode import ID_NAMESPACE, image_id
