"""The synthetic shapes world: determinism, unique ground truth, unambiguous captions, splits."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.data import load_gallery, load_meta, load_triplets, resolve_path
from retrieval.data.shapes import (
    CELL_WORDS,
    COLOR_WORDS,
    MOD_TYPES,
    SHAPE_WORDS,
    SIZE_WORDS,
    Obj,
    ShapesConfig,
    apply_op,
    apply_ops,
    choose_heldout,
    generate,
    make_scene,
    parse_signature,
    render_scene,
    signature,
)

TINY = {"train": 300, "val": 50, "test": 50, "test_unseen": 50, "gallery": 400, "image_size": 32}
EVAL_SPLITS = ("val", "test", "test_unseen")


def _world(root: Path, seed: int, workers: int) -> Path:
    out = root / f"seed{seed}-w{workers}"
    generate(ShapesConfig(seed=seed, workers=workers, **TINY), out)
    return out


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    return {
        "a": _world(root, 1, workers=2),
        "b": _world(root, 1, workers=1),  # same seed, other worker count
        "c": _world(root, 2, workers=2),
    }


@pytest.fixture(scope="module")
def world(worlds: dict[str, Path]) -> Path:
    return worlds["a"]


def _hashes(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- determinism


def test_same_seed_is_byte_identical_regardless_of_workers(worlds: dict[str, Path]) -> None:
    a, b = _hashes(worlds["a"]), _hashes(worlds["b"])
    assert a.keys() == b.keys()
    assert len([k for k in a if k.endswith(".png")]) > 500
    assert a == b  # every JSONL, meta.json and image


def test_other_seed_differs(worlds: dict[str, Path]) -> None:
    a, c = worlds["a"], worlds["c"]
    for name in ("train.jsonl", "test.jsonl", "gallery.jsonl"):
        assert (a / name).read_bytes() != (c / name).read_bytes()
    img = "images/gallery/000/g000000.png"
    assert (a / img).read_bytes() != (c / img).read_bytes()


def test_sizes_and_meta(world: Path) -> None:
    meta = load_meta(world)
    assert meta["generator"] and meta["seed"] == 1 and meta["image_size"] == 32
    for split in ("train", *EVAL_SPLITS):
        assert len(load_triplets(world, split)) == TINY[split] == meta["sizes_per_split"][split]
        assert sum(meta["counts_per_type"][split].values()) == TINY[split]
    assert len(load_gallery(world)) >= TINY["gallery"]
    from PIL import Image

    g = load_gallery(world)[0]
    with Image.open(resolve_path(world, g.path)) as im:
        assert im.size == (32, 32) and im.mode == "RGB"


# --------------------------------------------------------------------------- ground truth


def test_gallery_has_one_image_per_signature(world: Path) -> None:
    gallery = load_gallery(world)
    sigs = [g.metadata["signature"] for g in gallery]
    assert len(sigs) == len(set(sigs))
    assert len({g.path for g in gallery}) == len(gallery)
    for g in gallery:
        assert signature(parse_signature(g.metadata["signature"])) == g.metadata["signature"]
        assert resolve_path(world, g.path).is_file()


def test_eval_ids_resolve_to_the_rederived_signatures(world: Path) -> None:
    by_id = {g.id: g for g in load_gallery(world)}
    for split in EVAL_SPLITS:
        for t in load_triplets(world, split):
            ref = by_id[t.reference_id]
            assert t.target_id is not None
            tgt = by_id[t.target_id]
            assert ref.path == t.reference and tgt.path == t.target
            assert ref.metadata["signature"] == t.extra["reference_signature"]
            # Re-derive the target by applying the recorded modification to the reference.
            derived = apply_ops(parse_signature(ref.metadata["signature"]), t.extra["ops"])
            assert signature(derived) == tgt.metadata["signature"] == t.extra["target_signature"]
            assert t.reference_id != t.target_id
            assert len(t.extra["ops"]) == (2 if t.type == "combo" else 1)
            if t.type != "combo":
                assert t.extra["ops"][0]["op"] == t.type


def test_train_targets_rederive(world: Path) -> None:
    for t in load_triplets(world, "train"):
        derived = apply_ops(parse_signature(t.extra["reference_signature"]), t.extra["ops"])
        assert signature(derived) == t.extra["target_signature"]
        assert t.reference_id == "" and t.target_id is None
        assert t.target is not None and resolve_path(world, t.target).is_file()
        assert resolve_path(world, t.reference).is_file()


def test_hard_distractors_present(world: Path) -> None:
    gallery = load_gallery(world)
    sigs = {g.metadata["signature"] for g in gallery}
    sources = Counter(g.metadata["source"] for g in gallery)
    assert sources["distractor"] > 0
    # Many targets have a gallery neighbour that differs in exactly one object.
    targets = [t.extra["target_signature"] for t in load_triplets(world, "test")]
    near = sum(
        any(len(set(ts.split("|")) ^ set(s.split("|"))) == 2 for s in sigs if s != ts)
        for ts in targets
    )
    assert near >= 0.9 * len(targets)


# --------------------------------------------------------------------------- captions


def _phrase_alternatives(words: dict[Any, tuple[str, ...]]) -> list[tuple[str, Any]]:
    pairs = [(w, k) for k, ws in words.items() for w in ws]
    return sorted(pairs, key=lambda p: -len(p[0]))  # longest first: "top left corner"


def _parse_ref(text: str) -> dict[str, Any]:
    """Independent reading of a referring expression's text back into attributes."""
    assert text.startswith("the "), text
    attrs: dict[str, Any] = {}
    rest = text[4:]
    m = re.search(r" (?:in|at) the (.+)$", rest)
    if m:
        cell = dict(_phrase_alternatives(CELL_WORDS))[m.group(1)]
        attrs["cell"] = cell
        rest = rest[: m.start()]
    for tok in rest.split():
        for key, vocab in (("size", SIZE_WORDS), ("color", COLOR_WORDS), ("shape", SHAPE_WORDS)):
            hits = [k for k, ws in vocab.items() if tok in ws]
            if hits:
                attrs[key] = hits[0]
    return attrs


def _count(scene: tuple[Obj, ...], attrs: dict[str, Any]) -> list[Obj]:
    # Deliberately not retrieval.data.shapes.matching.
    return [
        o
        for o in scene
        if all(
            {"cell": o.cell, "color": o.color, "shape": o.shape, "size": o.size}[k] == v
            for k, v in attrs.items()
        )
    ]


def test_no_ambiguous_reference(world: Path) -> None:
    n_checked = 0
    for split in ("train", *EVAL_SPLITS):
        for t in load_triplets(world, split):
            assert t.caption == t.caption.lower() and t.caption.strip() == t.caption
            scene = parse_signature(t.extra["reference_signature"])
            for i, op in enumerate(t.extra["ops"]):
                if op["op"] == "add":
                    assert op["cell"] not in {o.cell for o in scene}
                    continue
                ref = op["ref"]
                assert ref["matches"] == 1
                assert ref["text"] in t.caption
                assert _parse_ref(ref["text"]) == ref["attrs"], ref
                found = _count(parse_signature(t.extra["reference_signature"]), ref["attrs"])
                assert [o.cell for o in found] == [op["cell"]], (t.caption, found)
                if i == 1:  # also unique after the first step of a combo
                    mid = apply_op(
                        parse_signature(t.extra["reference_signature"]), t.extra["ops"][0]
                    )
                    assert [o.cell for o in _count(mid, ref["attrs"])] == [op["cell"]]
                n_checked += 1
            if len(t.extra["ops"]) == 2:
                scene = apply_op(scene, t.extra["ops"][0])
    assert n_checked > 300


def test_captions_vary() -> None:
    rows = []
    rng = random.Random(0)
    from retrieval.data.shapes import _Pool, make_modification, sample_scene

    pool = _Pool(frozenset(), unseen=False)
    for kind in MOD_TYPES:
        caps = set()
        for _ in range(200):
            res = make_modification(rng, sample_scene(rng, pool), kind, pool)
            if res:
                caps.add(res[1].split(" ")[0])
        rows.append((kind, caps))
        assert len(caps) >= 3, (kind, caps)  # several templates / verbs per type


# --------------------------------------------------------------------------- splits


def _scenes(world: Path, split: str) -> set[str]:
    out = set()
    for t in load_triplets(world, split):
        out.add(t.extra["reference_signature"])
        out.add(t.extra["target_signature"])
    return out


def test_splits_have_disjoint_scenes(world: Path) -> None:
    train = _scenes(world, "train")
    gallery = {g.metadata["signature"] for g in load_gallery(world)}
    assert not train & gallery
    ev = {s: _scenes(world, s) for s in EVAL_SPLITS}
    assert not ev["val"] & ev["test"]
    assert not ev["val"] & ev["test_unseen"]
    assert not ev["test"] & ev["test_unseen"]


def test_heldout_combos(world: Path) -> None:
    held = {f"{s}-{c}" for s, c in choose_heldout(load_meta(world)["seed"])}
    assert held == set(load_meta(world)["heldout_combos"]) and len(held) == 4

    def combos(sig: str) -> set[str]:
        return {f"{o.shape}-{o.color}" for o in parse_signature(sig)}

    for split in ("train", "val", "test"):
        for sig in _scenes(world, split):
            assert not combos(sig) & held, (split, sig)
    for t in load_triplets(world, "test_unseen"):
        assert combos(t.extra["target_signature"]) & held
        assert set(t.extra["unseen_combos"]) <= held and t.extra["unseen_combos"]


def test_every_type_present_and_balanced(world: Path) -> None:
    for split in ("train", *EVAL_SPLITS):
        counts = Counter(t.type for t in load_triplets(world, split))
        assert set(counts) == set(MOD_TYPES)
        assert max(counts.values()) - min(counts.values()) <= 1


def test_max_triplets_per_reference(world: Path) -> None:
    for split in ("train", "test"):
        refs = Counter(t.extra["reference_signature"] for t in load_triplets(world, split))
        assert max(refs.values()) <= 3


# --------------------------------------------------------------------------- rendering


def test_renders_of_one_scene_differ_and_scenes_differ() -> None:
    scene = make_scene([Obj(0, "red", "circle", "L"), Obj(4, "blue", "square", "S")])
    a = np.asarray(render_scene(scene, 32, (0, 1, 1)), dtype=np.int16)
    b = np.asarray(render_scene(scene, 32, (0, 1, 2)), dtype=np.int16)
    again = np.asarray(render_scene(scene, 32, (0, 1, 1)), dtype=np.int16)
    assert (a == again).all()  # same key, same pixels
    assert (a != b).mean() > 0.5  # nuisance: background shade, noise, jitter
    other = make_scene([Obj(0, "green", "circle", "L"), Obj(4, "blue", "square", "S")])
    c = np.asarray(render_scene(other, 32, (0, 1, 1)), dtype=np.int16)
    assert (a != c).any()


def test_signature_roundtrip_and_errors() -> None:
    scene = make_scene([Obj(4, "blue", "square", "S"), Obj(0, "red", "circle", "L")])
    assert signature(scene) == "0:red-circle-L|4:blue-square-S"
    assert parse_signature(signature(scene)) == scene
    with pytest.raises(ValueError):
        make_scene([Obj(1, "red", "circle", "L"), Obj(1, "blue", "square", "S")])
    with pytest.raises(ValueError):
        parse_signature("0:pink-circle-L")
    with pytest.raises(ValueError):
        apply_op(scene, {"op": "move", "cell": 0, "to": 4})


def test_cli_shapes(tmp_path: Path) -> None:
    typer_testing = pytest.importorskip("typer.testing")
    import typer

    from retrieval.data.cli import register

    app = typer.Typer()
    register(app)
    args = ["data", "shapes", "--out", str(tmp_path / "w"), "--seed", "3", "--train", "30"]
    args += ["--val", "10", "--test", "10", "--test-unseen", "10", "--gallery", "50"]
    args += ["--image-size", "24", "--workers", "1"]
    res = typer_testing.CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "train=30" in res.output
    meta = json.loads((tmp_path / "w" / "meta.json").read_text())
    assert meta["sizes_per_split"]["gallery"] >= 50
    bad = typer_testing.CliRunner().invoke(app, [*args[:4], "--image-size", "4"])
    assert bad.exit_code == 2 and "image_size" in bad.output
    again = typer_testing.CliRunner().invoke(app, args)  # would mix two worlds
    assert again.exit_code == 2 and "--overwrite" in again.output
    (tmp_path / "w" / "images" / "stale.png").write_bytes(b"x")
    again = typer_testing.CliRunner().invoke(app, [*args, "--seed", "4", "--overwrite"])
    assert again.exit_code == 0, again.output
    assert not (tmp_path / "w" / "images" / "stale.png").exists()
    assert json.loads((tmp_path / "w" / "meta.json").read_text())["seed"] == 4
