import torch

from tfcompile import corpus


def test_sentences_are_distinct_prose_and_deterministic():
    sentences = corpus.english_sentences(300)
    assert len(set(sentences)) == 300
    assert all(8 <= len(s.split()) <= 40 for s in sentences)
    assert corpus.english_sentences(5, offset=10) == sentences[10:15]


def test_encode_sentences_right_pads_with_cls_and_sep():
    ids, mask = corpus.encode_sentences(corpus.english_sentences(8), seq=24)
    assert ids.shape == mask.shape == (8, 24)
    lengths = mask.sum(1)
    assert (ids[:, 0] == 101).all()  # [CLS]
    for row, length in enumerate(lengths.tolist()):
        assert ids[row, length - 1] == 102  # [SEP], also when truncated
        assert (mask[row, :length] == 1).all() and (mask[row, length:] == 0).all()
    assert lengths.min() < 24  # some sentence is shorter than 24 tokens, so padding is exercised


def test_encode_document_gives_exactly_seq_tokens():
    ids, mask = corpus.encode_document(2048)
    assert ids.shape == (1, 2048) and mask.dtype == torch.int64 and int(mask.sum()) == 2048


def test_calibration_and_heldout_passages_are_disjoint_and_interleaved():
    calibration, heldout = corpus.passage_offsets(128, 32, 64)
    assert len(calibration) == 32 and len(heldout) == 64
    windows = sorted(calibration + heldout)
    assert all(b - a >= 8 * 128 for a, b in zip(windows, windows[1:]))  # no character read twice
    assert min(calibration) < max(heldout) and min(heldout) < max(calibration)  # neither from one region
    assert windows[-1] > len(corpus.running_text()) * 0.9  # spread over the whole text
    ids, mask = corpus.encode_passages(128, calibration[:3])
    assert ids.shape == (3, 128) and bool(mask.all())
    import pytest

    with pytest.raises(ValueError, match="disjoint passages"):
        corpus.passage_offsets(4096, 100, 100)


def test_calibration_file_hostile_inputs(tmp_path):
    import pytest

    from tfcompile.errors import InvalidOptionError

    good = tmp_path / "good.txt"
    good.write_text("The first sentence.\n\n  Second   one here.\n")
    assert corpus.read_calibration_file(good) == ["The first sentence.", "Second one here."]
    big = tmp_path / "big.txt"
    with big.open("wb") as handle:
        handle.truncate(corpus.MAX_CALIBRATION_BYTES + 1)  # sparse: refused by size before any byte is read
    binary = tmp_path / "binary.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"a sentence\x00 with a NUL\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    long_line = tmp_path / "long.txt"
    long_line.write_text("word " * 2000)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    cases = {tmp_path / "missing.txt": "No such file", tmp_path: "not a file", big: "bytes; a calibration file",
             binary: "not a UTF-8 text file", nul: "control characters", latin: "not a UTF-8 text file",
             long_line: "one sentence per line", empty: "no sentences"}
    for path, message in cases.items():
        with pytest.raises(InvalidOptionError, match=message) as caught:
            corpus.read_calibration_file(path)
        assert "\n" not in str(caught.value) and str(caught.value).startswith("--calibration-data ")
