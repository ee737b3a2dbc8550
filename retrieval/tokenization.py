"""BERT WordPiece tokenization for the Q-Former, with nothing fetched at run time.

Built directly on the `tokenizers` library from a ``vocab.txt`` that every checkpoint folder
carries. (transformers 5's ``BertTokenizer(vocab_file=...)`` silently ignores the file and maps
every word to [UNK]; building the WordPiece model ourselves avoids that trap.) BLIP-2/LAVIS adds
``[DEC]`` as the bos token after the 30522 BERT tokens, so real checkpoints have vocab 30523.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

logger = logging.getLogger(__name__)

BUILTIN_VOCAB = Path(__file__).parent / "assets" / "builtin_vocab.txt"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_CAPTION_STRIP = re.compile(r"[.!\"()*#:;~]")


def clean_caption(text: str) -> str:
    """SPRC/LAVIS caption cleaning: lowercase, strip ``.!"()*#:;~``, squeeze spaces."""
    text = _CAPTION_STRIP.sub(" ", text.lower())
    return re.sub(r"\s{2,}", " ", text).strip()


def read_vocab(path: str | Path) -> dict[str, int]:
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            token = line.rstrip("\n")
            if token and token not in vocab:
                vocab[token] = len(vocab)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"{path}: vocabulary lacks special tokens {missing}")
    return vocab


@dataclass
class TextBatch:
    input_ids: torch.Tensor  # [B, L] int64, [CLS] ... [SEP] then [PAD]
    attention_mask: torch.Tensor  # [B, L] int64, 1 for real tokens


class QFormerTokenizer:
    """WordPiece tokenizer with BERT uncased normalisation and a ``[DEC]`` bos token."""

    def __init__(self, vocab: dict[str, int], max_length: int = 32) -> None:
        if "[DEC]" not in vocab:  # as LAVIS: tokenizer.add_special_tokens({"bos_token": "[DEC]"})
            vocab = {**vocab, "[DEC]": len(vocab)}
        self.vocab = vocab
        self.max_length = max_length
        tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        tok.enable_truncation(max_length=max_length)
        self._tok = tok
        self.pad_token_id = vocab["[PAD]"]
        self.cls_token_id = vocab["[CLS]"]
        self.sep_token_id = vocab["[SEP]"]
        self.unk_token_id = vocab["[UNK]"]
        self.mask_token_id = vocab.get("[MASK]", self.unk_token_id)
        self.bos_token_id = vocab["[DEC]"]

    @classmethod
    def from_file(cls, path: str | Path, max_length: int = 32) -> QFormerTokenizer:
        return cls(read_vocab(path), max_length=max_length)

    @classmethod
    def builtin(cls, max_length: int = 32) -> QFormerTokenizer:
        return cls.from_file(BUILTIN_VOCAB, max_length=max_length)

    def __len__(self) -> int:
        return len(self.vocab)

    def save(self, folder: str | Path) -> None:
        """Writes ``vocab.txt`` (ids are line numbers)."""
        ordered = sorted(self.vocab.items(), key=lambda kv: kv[1])
        Path(folder, "vocab.txt").write_text(
            "".join(t + "\n" for t, _ in ordered), encoding="utf-8"
        )

    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def __call__(
        self, texts: list[str], padding: str = "longest", device: torch.device | str = "cpu"
    ) -> TextBatch:
        """Clean and encode captions. ``padding="max_length"`` pads to ``max_length`` as SPRC
        does; ``"longest"`` gives identical features (padding is masked) and is faster."""
        encs = self._tok.encode_batch([clean_caption(t) for t in texts])
        length = self.max_length if padding == "max_length" else max(len(e.ids) for e in encs)
        ids = torch.full((len(encs), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encs), length), dtype=torch.long)
        for i, e in enumerate(encs):
            n = len(e.ids)
            ids[i, :n] = torch.tensor(e.ids, dtype=torch.long)
            mask[i, :n] = 1
        return TextBatch(ids.to(device), mask.to(device))
