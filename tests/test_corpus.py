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
