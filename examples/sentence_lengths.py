"""Write ``sentence_lengths.txt``: the token lengths of real English sentences, as a histogram.

The sentences are the prose of the Python language reference (``tfcompile.corpus``),
tokenized with the trained MiniLM's own WordPiece tokenizer, ``[CLS]`` and
``[SEP]`` included: the request-length distribution ``make demo`` optimizes for.
Run: ``.venv/bin/python examples/sentence_lengths.py > examples/sentence_lengths.txt``.
"""

from collections import Counter

from tfcompile import corpus


def main() -> None:
    lengths = Counter(len(e.ids) for e in corpus.minilm_tokenizer().encode_batch(corpus.english_sentences()))
    print("# token length, number of sentences (MiniLM WordPiece, [CLS] and [SEP] included)")
    print("# from the prose of the Python language reference; examples/sentence_lengths.py wrote it")
    for length, count in sorted(lengths.items()):
        print(length, count)


if __name__ == "__main__":
    main()
