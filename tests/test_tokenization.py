"""QFormerTokenizer: WordPiece from the checkpoint's vocab.txt, [DEC] bos, caption cleaning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retrieval.tokenization import BUILTIN_VOCAB, QFormerTokenizer, clean_caption, read_vocab

BERT_LIKE = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "dog",
    "##s",
    "run",
    "red",
    "shirt",
    "cafe",
    ",",
]


@pytest.fixture()
def vocab_file(tmp_path: Path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("".join(t + "\n" for t in BERT_LIKE), encoding="utf-8")
    return path


def test_known_words_of_a_vocab_file_get_their_ids(vocab_file: Path) -> None:
    """The transformers 5 trap: BertTokenizer(vocab_file=...) ignores the file and gives [UNK]."""
    tok = QFormerTokenizer.from_file(vocab_file)
    ids = {t: i for i, t in enumerate(BERT_LIKE)}
    batch = tok(["The dogs run"])
    assert batch.input_ids.tolist() == [
        [ids["[CLS]"], ids["the"], ids["dog"], ids["##s"], ids["run"], ids["[SEP]"]]
    ]
    assert batch.attention_mask.tolist() == [[1] * 6]
    assert tok.tokenize("red shirt, dogs") == ["red", "shirt", ",", "dog", "##s"]
    assert tok.tokenize("zebra") == ["[UNK]"]


def test_dec_is_appended_as_bos(vocab_file: Path) -> None:
    tok = QFormerTokenizer.from_file(vocab_file)
    assert tok.bos_token_id == len(BERT_LIKE) == tok.vocab["[DEC]"]
    assert len(tok) == len(BERT_LIKE) + 1
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 1, 2, 3)
    # saved vocab.txt keeps ids as line numbers, [DEC] last; reloading changes nothing
    tok.save(vocab_file.parent)
    lines = vocab_file.read_text().splitlines()
    assert lines == [*BERT_LIKE, "[DEC]"]
    again = QFormerTokenizer.from_file(vocab_file)
    assert again.vocab == tok.vocab and len(again) == len(tok)


def test_builtin_vocab_words_and_existing_dec() -> None:
    tok = QFormerTokenizer.builtin()
    words = BUILTIN_VOCAB.read_text(encoding="utf-8").splitlines()
    ids = {t: i for i, t in enumerate(words)}
    for word in ("red", "circle", "bigger", "remove", "left", "shirt", "dog"):
        assert tok.tokenize(word) == [word]
        assert tok([word]).input_ids[0, 1].item() == ids[word]
    # [DEC] already in the builtin vocabulary: reused, not appended twice
    assert tok.bos_token_id == ids["[DEC]"] and len(tok) == len(words)
    batch = tok(["Make the circle RED."])
    assert (batch.input_ids != tok.unk_token_id).all()


def test_caption_cleaning() -> None:
    assert (
        clean_caption('Make it RED!  (and) "bigger"; now: ~ok~ #1*.')
        == "make it red and bigger now ok 1"
    )
    assert clean_caption("   ") == ""
    tok = QFormerTokenizer.builtin()
    assert tok(["Is RED."]).input_ids.tolist() == tok(["is red"]).input_ids.tolist()


def test_accents_are_stripped_as_bert_uncased(vocab_file: Path) -> None:
    tok = QFormerTokenizer.from_file(vocab_file)
    assert tok.tokenize("Café") == ["cafe"]


def test_padding_and_truncation(vocab_file: Path) -> None:
    tok = QFormerTokenizer.from_file(vocab_file, max_length=8)
    batch = tok(["the dog", "the dogs run the dogs run the dogs run"], padding="max_length")
    assert batch.input_ids.shape == (2, 8) and batch.input_ids.dtype == torch.long
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert batch.input_ids[0, 4:].eq(tok.pad_token_id).all()
    # truncated to max_length with [CLS] ... [SEP] kept (as LAVIS/HF truncation)
    assert batch.attention_mask[1].tolist() == [1] * 8
    assert batch.input_ids[1, 0] == tok.cls_token_id and batch.input_ids[1, -1] == tok.sep_token_id
    longest = tok(["the dog", "run"])
    assert longest.input_ids.shape == (2, 4)
    assert longest.input_ids[1].tolist() == [
        tok.cls_token_id,
        8,
        tok.sep_token_id,
        tok.pad_token_id,
    ]


def test_vocab_without_special_tokens_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "vocab.txt"
    bad.write_text("the\ndog\n")
    with pytest.raises(ValueError, match=r"special tokens.*\[PAD\]"):
        read_vocab(bad)
