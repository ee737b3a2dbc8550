"""Datasets in the shared triplet JSONL format: the synthetic shapes world and converters.

Import the format and loaders from here (cheap: no Pillow/numpy at import time)::

    from retrieval.data import Triplet, GalleryItem, load_triplets, load_gallery
"""

from retrieval.data.triplets import (
    GALLERY_FILE,
    META_FILE,
    SPLITS,
    DataFormatError,
    GalleryItem,
    Triplet,
    check_split_against_gallery,
    gallery_index,
    iter_jsonl,
    load_gallery,
    load_meta,
    load_triplets,
    read_jsonl,
    resolve_path,
    write_jsonl,
)

__all__ = [
    "GALLERY_FILE",
    "META_FILE",
    "SPLITS",
    "DataFormatError",
    "GalleryItem",
    "Triplet",
    "check_split_against_gallery",
    "gallery_index",
    "iter_jsonl",
    "load_gallery",
    "load_meta",
    "load_triplets",
    "read_jsonl",
    "resolve_path",
    "write_jsonl",
]
