"""``Encoder``: the public face of the SPRC model (factory, preprocessing, encode, save/load).

    enc = Encoder.from_pretrained("PATH_OR_PRESET", device="cpu", dtype="float32")
    enc.encode_targets(images)         # list[PIL] -> np.ndarray [N, Q, D] float32, rows L2-normalised
    enc.encode_queries(images, texts)  # -> np.ndarray [N, D] float32, L2-normalised
    enc.fingerprint                    # stable over save/load; changes with weights/config/preprocessing
    enc.save_pretrained("DIR")

A checkpoint folder holds ``config.json`` (SPRCConfig), ``model.safetensors`` and ``vocab.txt``.
A preset name builds the architecture with random (seeded, LAVIS-style) weights.
Which one a name means, and where random weights are refused: ``retrieval.model_source``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from retrieval.config import SPRCConfig, get_config, parse_model_source
from retrieval.modeling_sprc import SPRCModel
from retrieval.precision import resolve_precision, storage_dtype
from retrieval.preprocess import ImagePreprocessor
from retrieval.tokenization import QFormerTokenizer

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
VOCAB_NAME = "vocab.txt"
FORMAT_VERSION = 1  # bump when the meaning of a checkpoint folder changes


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" -> cuda when available, else cpu. Picked once per Encoder."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """A precision name (retrieval.precision: auto|fp32|bf16|fp16, or float32|bfloat16|float16)
    -> the compute dtype on ``device`` ("auto": bfloat16 on CUDA, float32 on CPU)."""
    return resolve_precision(dtype, device).dtype


def set_threads(num_threads: int | None) -> None:
    """Torch intra-op threads (None: CIR_NUM_THREADS env, else torch's default)."""
    n = num_threads or int(os.environ.get("CIR_NUM_THREADS", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)


def state_dict_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) in key order: identical weights, identical digest."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        raw = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
        h.update(raw.numpy().tobytes())
    return h.hexdigest()


def build_model(config: SPRCConfig, seed: int = 0) -> SPRCModel:
    """The architecture with from-scratch (LAVIS-style) random weights, seeded."""
    model = SPRCModel(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def load_model_weights(config: SPRCConfig, state: dict[str, torch.Tensor]) -> SPRCModel:
    """Build on the meta device (no wasted random init of a 1B-parameter ViT) and assign the
    checkpoint's tensors. Strict: any missing or unexpected key is an error naming it."""
    with torch.device("meta"):
        model = SPRCModel(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(
            f"checkpoint does not match the architecture: missing={missing[:20]} unexpected={unexpected[:20]}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    # non-persistent buffers stay on meta after assign: materialise them
    model.embeddings.position_ids = torch.arange(config.max_position_embeddings).expand((1, -1))
    return model


class Encoder:
    """SPRC encoder with its preprocessing and tokenizer; device and dtype fixed at load."""

    def __init__(
        self,
        model: SPRCModel,
        tokenizer: QFormerTokenizer,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        weights_digest: str | None = None,
        attn_implementation: str = "auto",
    ) -> None:
        self.config: SPRCConfig = model.config
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        # "auto": eager matmul + softmax on CPU (the kernel `cir train` uses there; at batch 1 the
        # two are within noise on an idle CPU, benchmarks/attn_precision.py), SDPA on CUDA
        if attn_implementation == "auto":
            attn_implementation = "sdpa" if self.device.type == "cuda" else "eager"
        model.set_attn_implementation(attn_implementation)
        self.tokenizer = tokenizer
        self.preprocessor = ImagePreprocessor.from_config(self.config)
        digest = weights_digest or state_dict_digest(model.state_dict())
        self.fingerprint = self._fingerprint(digest)
        # bf16/fp16: the ViT in that dtype, the Q-Former side float32 (_keep_in_fp32_modules)
        self.model = model.to(device=self.device).to_inference_dtype(self.dtype).eval()
        #: built from a preset name with random weights (see ``is_untrained_preset``)
        self.untrained = False
        #: where the weights came from: the checkpoint folder, or "preset NAME (random weights)"
        self.source = "in-memory model"

    # ------------------------------------------------------------ properties
    @property
    def preset(self) -> str:
        return self.config.name

    @property
    def num_queries(self) -> int:
        return self.config.num_query_tokens

    @property
    def dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def max_text_tokens(self) -> int:
        return self.config.max_text_len

    def _fingerprint(self, weights_digest: str) -> str:
        cfg = self.config.to_dict()
        cfg.pop("extra", None)  # provenance notes do not change behaviour
        payload = json.dumps(
            {
                "format": FORMAT_VERSION,
                "config": cfg,
                "preprocess": self.preprocessor.to_dict(),
                "vocab": hashlib.sha256(
                    "\n".join(
                        t for t, _ in sorted(self.tokenizer.vocab.items(), key=lambda kv: kv[1])
                    ).encode()
                ).hexdigest(),
                "weights": weights_digest,
            },
            sort_keys=True,
        )
        return f"{self.config.name}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"

    # -------------------------------------------------------------- factory
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        *,
        num_threads: int | None = None,
        seed: int = 0,
    ) -> Encoder:
        """A checkpoint folder, or a preset name (random weights, seeded): which one by
        ``retrieval.config.parse_model_source`` (``preset:NAME``, ``local-dir:PATH``, or a bare
        string where an existing folder wins over a preset name)."""
        set_threads(num_threads)
        src = parse_model_source(name_or_path)  # the one rule; UnknownModelError otherwise
        if src.is_preset:
            config = get_config(f"preset:{src.ref}")
            model = build_model(config, seed=seed)
            tokenizer = QFormerTokenizer.builtin(max_length=config.max_text_len)
            if len(tokenizer) > config.vocab_size:
                raise ValueError("builtin vocabulary larger than the preset's vocab_size")
            enc = cls(model, tokenizer, device=device, dtype=dtype)
            enc.untrained, enc.source = True, f"preset {src.ref} (random weights)"
            return enc
        folder = Path(src.ref)
        for name in (CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"{folder} is not an SPRC checkpoint folder: {name} is missing"
                )
        config = SPRCConfig.load(folder / CONFIG_NAME)
        state = load_file(str(folder / WEIGHTS_NAME))
        digest = state_dict_digest(state)
        model = load_model_weights(config, state)
        tokenizer = QFormerTokenizer.from_file(folder / VOCAB_NAME, max_length=config.max_text_len)
        if len(tokenizer) > config.vocab_size:
            raise ValueError(
                f"{folder}: vocab.txt has {len(tokenizer)} tokens > vocab_size {config.vocab_size}"
            )
        logger.info("loaded %s (%s) from %s", config.name, digest[:12], folder)
        enc = cls(model, tokenizer, device=device, dtype=dtype, weights_digest=digest)
        enc.source = str(folder.resolve())
        return enc

    def save_pretrained(
        self, folder: str | Path, weights_dtype: str | torch.dtype | None = None
    ) -> Path:
        """Write config.json + model.safetensors + vocab.txt. ``weights_dtype`` (a
        retrieval.precision name, e.g. "fp16") stores smaller weights; the default stores every
        tensor in the Encoder's dtype (also the float32-kept Q-Former side of a bf16 one)."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        dt = self.dtype if weights_dtype is None else storage_dtype(weights_dtype)
        state = {k: v.to(dt) if v.is_floating_point() else v for k, v in state.items()}
        tmp = out / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "cir_format": str(FORMAT_VERSION)})
        os.replace(tmp, out / WEIGHTS_NAME)
        self.config.save(out / CONFIG_NAME)
        self.tokenizer.save(out)
        return out

    # --------------------------------------------------------------- helpers
    @contextmanager
    def _infer(self) -> Iterator[None]:
        # no autocast (retrieval.precision): each module computes in its weights' dtype, so the
        # float32 Q-Former stays float32 under a bf16 ViT, on CUDA as on CPU
        with torch.inference_mode():
            yield

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """list[PIL] -> [N, 3, S, S] float32 (CPU)."""
        return self.preprocessor.batch(list(images))

    def _pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.to(device=self.device, dtype=self.dtype, non_blocking=True)

    @staticmethod
    def _np(t: torch.Tensor) -> np.ndarray:
        return t.float().cpu().numpy()

    # ------------------------------------------------------------- encoders
    def encode_target_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Preprocessed pixels [N, 3, S, S] -> target features [N, Q, D] (float32)."""
        with self._infer():
            feats = self.model.target_features(
                self.model.image_features(self._pixels(pixel_values))
            )
            return self._np(feats)

    def encode_target_pixels_and_patches(
        self, pixel_values: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray]:
        """One ViT pass: target features [N, Q, D] and the ViT tokens [N, T, C] (float32) that a
        "patches" re-ranker reads of a candidate."""
        with self._infer():
            img = self.model.image_features(self._pixels(pixel_values))
            return self._np(self.model.target_features(img)), self._np(img)

    def encode_targets(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Gallery images -> [N, Q, D] float32, each of the Q rows L2-normalised."""
        if not images:
            return np.zeros((0, self.num_queries, self.dim), np.float32)
        parts = [
            self.encode_target_pixels(self.preprocess(images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(parts)

    def reference_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Reference images -> ViT features [N, T, C] on the encoder's device (cacheable)."""
        with self._infer():
            return self.model.image_features(self._pixels(self.preprocess(images)))

    def encode_queries(
        self,
        images: Sequence[Image.Image] | None,
        texts: Sequence[str],
        *,
        ref_features: torch.Tensor | None = None,
        batch_size: int = 32,
    ) -> np.ndarray:
        """Reference images (or their cached ViT features) + captions -> [N, D] float32."""
        texts = list(texts)
        if ref_features is None:
            if images is None or len(images) != len(texts):
                raise ValueError("encode_queries needs one reference image per text")
        elif ref_features.shape[0] != len(texts):
            raise ValueError("encode_queries needs one reference feature row per text")
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            with self._infer():
                if ref_features is not None:
                    feats = ref_features[i : i + batch_size].to(self.device)
                else:
                    assert images is not None
                    feats = self.model.image_features(
                        self._pixels(self.preprocess(images[i : i + batch_size]))
                    )
                tok = self.tokenizer(chunk, device=self.device)
                out.append(
                    self._np(
                        self.model.composed_query(
                            feats.to(self.dtype), tok.input_ids, tok.attention_mask
                        )
                    )
                )
        return np.concatenate(out)

    def encode_texts(
        self, texts: Sequence[str], mode: str = "prompt", batch_size: int = 64
    ) -> np.ndarray:
        """Text-only queries [N, D]: ``prompt`` = SPRC's rtc path (prompt_tokens + caption),
        ``plain`` = BLIP-2's text [CLS] path."""
        fn = self.model.prompt_text_features if mode == "prompt" else self.model.text_features
        out = []
        for i in range(0, len(texts), batch_size):
            with self._infer():
                tok = self.tokenizer(list(texts[i : i + batch_size]), device=self.device)
                out.append(self._np(fn(tok.input_ids, tok.attention_mask)))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def __repr__(self) -> str:
        return f"Encoder({self.fingerprint}, device={self.device}, dtype={self.dtype})"
