"""World recipes: what a trainer may ask of a dataset beyond its triplets.

The generic trainer (retrieval/train.py) knows no synthetic world. For the options that need
one (``--caption-loss``: whole-scene captions; ``--hard-negatives``: rendered one-attribute
distractors) it looks a recipe up by name (``TrainConfig.recipe``, ``get_recipe``) and asks it.
The shapes world (retrieval/data/shapes.py) is the one recipe today (``SHAPES``); a new world
registers another object with the same three callables in ``RECIPES``.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from retrieval.data.shapes import (
    DISTRACTOR_KINDS,
    describe_scene,
    hard_negative,
    parse_signature,
    render_scene,
    signature,
)
from retrieval.preprocess import BatchNormaliser, ImagePreprocessor

logger = logging.getLogger(__name__)


class HardNegatives(Protocol):
    """What the trainer reads from a recipe's hard negatives."""

    k: int  # distractors per triplet

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [len(indices) * k, 3, S, S] (normalised) and their validity mask."""
        ...


class _AnyOf:
    """Membership in any of several sets, without copying them into one."""

    def __init__(self, *sets: set[str]) -> None:
        self.sets = sets

    def __contains__(self, item: object) -> bool:
        return any(item in s for s in self.sets)


def scene_captions(triplets: list[Any]) -> dict[str, str]:
    """Whole-image captions for every reference and target, from the scene signatures that
    the shapes generator records in each triplet's ``extra``."""
    out: dict[str, str] = {}
    for t in triplets:
        for path, key in ((t.reference, "reference_signature"), (t.target, "target_signature")):
            sig = (t.extra or {}).get(key)
            if sig is None:
                raise ValueError(
                    f"--caption-loss needs scene signatures in the triplets' extra ({key}); "
                    f"{path} has none (only shapes worlds carry them)"
                )
            out[path] = describe_scene(parse_signature(sig))
    return out


def parse_hard_negative_kinds(spec: str, k: int) -> list[tuple[str, ...]]:
    """``"cell,any"`` -> the attribute kinds each of ``k`` distractor slots may change (the
    last entry repeats); ValueError naming the bad part."""
    parts = [p.strip() for p in spec.split(",") if p.strip()] or ["any"]
    slots = []
    for p in parts:
        kinds = DISTRACTOR_KINDS if p == "any" else tuple(x.strip() for x in p.split("+"))
        bad = [x for x in kinds if x not in DISTRACTOR_KINDS]
        if bad:
            raise ValueError(
                f"hard negative kinds {spec!r}: unknown {bad}; use 'any' or "
                f"'+'-joined kinds of {', '.join(DISTRACTOR_KINDS)}, comma-separated per slot"
            )
        slots.append(kinds)
    return [slots[min(j, len(slots) - 1)] for j in range(k)]


class HardNegativeBank:
    """``k`` one-attribute distractors of every train triplet's target, rendered once and kept
    as uint8 [N, k, 3, S, S] like the trainer's ImageBank; ``valid`` [N, k] is False where the
    target has none (an empty scene). Deterministic in (seed, triplet index). Distractors never
    use a held-out (shape, colour) pair and never equal a gallery scene, so test_unseen stays
    unseen and no eval image is ever trained on, even as a negative; nor a train image's scene."""

    def __init__(
        self,
        data_dir: Path,
        triplets: list[Any],
        k: int,
        encoder_pre: ImagePreprocessor,
        seed: int,
        kinds: str = "any",
    ) -> None:
        slots = parse_hard_negative_kinds(kinds, k)
        meta_path = data_dir / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"--hard-negatives needs a shapes world (no {meta_path})")
        meta = json.loads(meta_path.read_text())
        size = int(meta["image_size"])
        heldout = {(s, c) for s, c in (x.split("-", 1) for x in meta.get("heldout_combos", []))}
        exclude: set[str] = set()
        gallery = data_dir / "gallery.jsonl"
        if gallery.is_file():
            for line in gallery.read_text().splitlines():
                if line.strip():
                    sig = (json.loads(line).get("metadata") or {}).get("signature")
                    if sig is not None:
                        exclude.add(sig)
        # Nor any train image's scene: a distractor equal to a batch-mate's target or reference
        # (e.g. the reference itself, one edit away) would be a false negative.
        for t in triplets:
            for key in ("reference_signature", "target_signature"):
                sig = (t.extra or {}).get(key)
                if sig is not None:
                    exclude.add(sig)
        s = encoder_pre.size
        self.k = k
        self.data = torch.zeros((len(triplets), k, 3, s, s), dtype=torch.uint8)
        self.valid = torch.zeros((len(triplets), k), dtype=torch.bool)
        for i, t in enumerate(tqdm(triplets, desc="hard negatives", unit="img", mininterval=2)):
            sig = (t.extra or {}).get("target_signature")
            if sig is None:
                raise ValueError(
                    f"--hard-negatives needs scene signatures in the triplets' extra "
                    f"(target_signature); {t.target} has none (only shapes worlds carry them)"
                )
            for j, neg in enumerate(self.scenes(t, i, k, seed, heldout, exclude, slots)):
                self.data[i, j] = encoder_pre.to_uint8(render_scene(neg, size, (seed, 7919, i, j)))
                self.valid[i, j] = True
        self.normalise = BatchNormaliser(encoder_pre)
        logger.info("hard negatives: %d of %d rendered", int(self.valid.sum()), self.valid.numel())

    @staticmethod
    def scenes(
        triplet: Any,
        i: int,
        k: int,
        seed: int,
        heldout: set[tuple[str, str]],
        exclude: set[str],
        kinds: list[tuple[str, ...]] | None = None,
    ) -> list[Any]:
        """Up to ``k`` distinct distractor scenes of triplet ``i``'s target (fewer if none);
        the j-th changes one of ``kinds[j]`` (default: any attribute)."""
        sig = triplet.extra["target_signature"]
        scene = parse_signature(sig)
        rng = random.Random(f"{seed}:hard-negative:{i}")
        seen = {sig}
        out = []
        for j in range(k):
            kind = kinds[j] if kinds else DISTRACTOR_KINDS
            neg = hard_negative(rng, scene, heldout, _AnyOf(exclude, seen), kinds=kind)
            if neg is None:
                break
            seen.add(signature(neg))
            out.append(neg)
        return out

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [len(indices) * k, 3, S, S] (normalised) and their validity mask."""
        idx = torch.tensor(indices)
        return self.normalise(self.data[idx].flatten(0, 1)), self.valid[idx].flatten()


@dataclass(frozen=True)
class Recipe:
    """A world's recipes for the trainer's world-specific options."""

    name: str  # the registry key (TrainConfig.recipe, cir train --recipe)
    # triplets -> whole-image caption of every reference and target path (--caption-loss)
    scene_captions: Callable[[list[Any]], dict[str, str]]
    # (spec, k) -> what each of k distractor slots changes; ValueError (--hard-negative-kinds)
    parse_hard_negative_kinds: Callable[[str, int], list[tuple[str, ...]]]
    # (data_dir, triplets, k, encoder_pre, seed, kinds) -> k distractors of each triplet's
    # target as a HardNegatives (--hard-negatives)
    hard_negatives: Callable[..., HardNegatives]


#: The synthetic shapes world (scene signatures in each triplet's ``extra``).
SHAPES = Recipe("shapes", scene_captions, parse_hard_negative_kinds, HardNegativeBank)

#: Recipes by name (TrainConfig.recipe, ``cir train --recipe``).
RECIPES: dict[str, Recipe] = {SHAPES.name: SHAPES}


def get_recipe(name: str) -> Recipe:
    """The recipe registered as ``name``; ValueError naming the known ones."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}") from None


__all__ = [
    "RECIPES",
    "HardNegativeBank",
    "HardNegatives",
    "Recipe",
    "SHAPES",
    "get_recipe",
    "parse_hard_negative_kinds",
    "scene_captions",
]
