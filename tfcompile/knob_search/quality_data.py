"""Calibration and held-out inputs for the quality of approximate variants, and the figure on each.

A budget-driven search must judge its candidates on one set of inputs and
report the chosen variant's quality on another: a figure measured on the inputs
the choice was tuned on is biased upwards (the search keeps whatever happened
to score well there). ``QualitySplits`` holds both sets, as whole batches of
the graph's static input shape, and the original model's outputs on them
(computed once):
- ``calibration``: what schedule searches and the variant search decide on;
- ``heldout``: disjoint text, read only to report the quality figure and to
  check that the chosen variant still meets the budget.

For a text model traced on real English (``graph.info["inputs"]``, the zoo's
sentence encoders: input_ids and attention_mask of [batch, seq]), the splits
are passages of ``seq`` tokens of the corpus's running text at disjoint,
interleaved places (``corpus.passage_offsets``), so neither split repeats a
sentence of the other. For the byte-level decoder (``tiny-decoder``) they are
disjoint windows of the text it was never trained on. ``from_lines`` builds them from a user's sentences
instead (alternate lines, one sentence per row, right-padded). Other models
get no splits (``for_graph`` returns None): their quality figure stays the one
on the example inputs (``tfcompile.verify``).

The figure is ``tfcompile.verify``'s (mean cosine for embeddings and hidden
states, top-1 agreement for logits) over every row of the split.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx

from tfcompile import corpus
from tfcompile.errors import InvalidOptionError
from tfcompile.graph import ModelGraph
from tfcompile.verify import compare_outputs

# Rows per split: enough that one odd passage moves the mean little (the standard error of the mean
# cosine is about 0.0015 at 0.98 on minilm passages), few enough that a candidate costs ~1 s at 128 tokens.
CALIBRATION_ROWS = 32
HELDOUT_ROWS = 64
TEXT_INPUTS = ["input_ids", "attention_mask"]


@dataclasses.dataclass
class SplitFigure:
    quality: float  # mean over the split's rows
    metric: str
    rows: int
    stderr: float  # standard error of the mean (per-row figures' spread / sqrt(rows)); 0 for top-1


@dataclasses.dataclass
class QualitySplits:
    calibration: list[tuple[torch.Tensor, ...]]  # batches of the graph's input shape
    heldout: list[tuple[torch.Tensor, ...]]
    source: str  # where the text came from, for the report
    output_names: list[str]
    references: dict[str, tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=dict)

    @classmethod
    def for_graph(cls, graph: ModelGraph, calibration_rows: int = CALIBRATION_ROWS,
                  heldout_rows: int = HELDOUT_ROWS) -> QualitySplits | None:
        """Corpus passages at the graph's shape, or None when the graph is not a text model on real English."""
        if graph.info.get("kind") == "byte-decoder":
            return cls._held_out_bytes(graph, calibration_rows, heldout_rows)
        shape = _text_shape(graph)
        if shape is None:
            return None
        batch, seq = shape
        calibration_rows, heldout_rows = (batch * math.ceil(n / batch) for n in (calibration_rows, heldout_rows))
        try:
            calib, held = corpus.passage_offsets(seq, calibration_rows, heldout_rows)
        except ValueError:
            return None  # passages too long for the text to hold both splits
        splits = cls(_batches(corpus.encode_passages(seq, calib), batch),
                     _batches(corpus.encode_passages(seq, held), batch),
                     f"passages of {seq} tokens of the Python language reference (corpus.py), "
                     f"{calibration_rows} calibration and {heldout_rows} held-out at disjoint places",
                     list(graph.output_names))
        splits.reference_for(graph)
        return splits

    @classmethod
    def _held_out_bytes(cls, graph: ModelGraph, calibration_rows: int, heldout_rows: int) -> QualitySplits | None:
        """Windows of the byte-level decoder's held-out text (the part it was never trained on)."""
        shapes = [tuple(t.shape) for t in graph.example_inputs]
        if list(graph.input_names) != ["input_ids"] or len(shapes[0]) != 2:
            return None
        batch, seq = shapes[0]
        calibration_rows, heldout_rows = (batch * math.ceil(n / batch) for n in (calibration_rows, heldout_rows))
        try:
            calib, held = corpus.byte_passage_offsets(seq, calibration_rows, heldout_rows)
        except ValueError:
            return None  # windows too long for the held-out text to hold both splits
        splits = cls(_batches((corpus.byte_passages(seq, calib),), batch),
                     _batches((corpus.byte_passages(seq, held),), batch),
                     f"windows of {seq} bytes of the Python language reference's last 5 % (never trained on), "
                     f"{calibration_rows} calibration and {heldout_rows} held-out, disjoint",
                     list(graph.output_names))
        splits.reference_for(graph)
        return splits

    @classmethod
    def from_lines(cls, graph: ModelGraph, lines: list[str], source: str) -> QualitySplits:
        """A user's sentences: even lines calibrate, odd lines are held out; one right-padded sentence a row.

        Tokenised with the WordPiece vocabulary shipped with minilm (BERT uncased); ``InvalidOptionError``
        when the model is not a text model of that vocabulary's size or there are too few sentences."""
        shape = _text_shape(graph, real_text=False)
        if shape is None:
            raise InvalidOptionError(f"{source}: calibration text needs a text model with input_ids and "
                                     "attention_mask inputs of [batch, seq]")
        batch, seq = shape
        calib, held = lines[0::2], lines[1::2]
        if len(held) < batch:
            raise InvalidOptionError(f"{source}: {len(lines)} sentences; need at least {2 * batch} (a batch of "
                                     f"{batch} to calibrate on and one held out)")
        encoded = corpus.encode_sentences(calib, seq), corpus.encode_sentences(held, seq)
        vocabulary = _vocabulary(graph)
        if vocabulary is not None and max(int(ids.max()) for ids, _ in encoded) >= vocabulary:
            raise InvalidOptionError(f"{source}: the model's vocabulary has {vocabulary} entries; the text is "
                                     "tokenised with BERT's uncased WordPiece vocabulary (30522)")
        splits = cls(_batches(encoded[0], batch), _batches(encoded[1], batch),
                     f"{source}: {len(calib)} calibration and {len(held)} held-out sentences (alternate lines)",
                     list(graph.output_names))
        splits.reference_for(graph)
        return splits

    def reference_for(self, original: ModelGraph) -> None:
        """The original model's outputs on both splits (run once; every variant is compared to them)."""
        for split in ("calibration", "heldout"):
            self.references[split] = _run(original, getattr(self, split))

    def rows(self, split: str) -> int:
        return sum(int(b[0].shape[0]) for b in getattr(self, split))

    def figure(self, graph: ModelGraph, split: str) -> SplitFigure:
        """The quality figure of ``graph`` against the original over every row of ``split``."""
        reference = self.references[split]
        got = _run(graph, getattr(self, split))
        check = compare_outputs(reference, got, self.output_names)
        per_row = _per_row_cosine(reference[0], got[0]) if check.quality_metric == "mean_cosine" else None
        stderr = float(per_row.std() / math.sqrt(len(per_row))) if per_row is not None and len(per_row) > 1 else 0.0
        return SplitFigure(check.quality, check.quality_metric, self.rows(split), stderr)


def _text_shape(graph: ModelGraph, real_text: bool = True) -> tuple[int, int] | None:
    if list(graph.input_names) != TEXT_INPUTS or (real_text and graph.info.get("inputs") != "real English text"):
        return None
    shapes = {tuple(t.shape) for t in graph.example_inputs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        return None
    batch, seq = next(iter(shapes))
    return int(batch), int(seq)


def _vocabulary(graph: ModelGraph) -> int | None:
    """Rows of the first embedding table (the token vocabulary), when the graph has one."""
    for node in graph.call_nodes():
        if node.target is torch.ops.aten.embedding.default:
            value = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
            return int(value.shape[0]) if value is not None else None
    return None


def _batches(inputs: tuple[torch.Tensor, ...], batch: int) -> list[tuple[torch.Tensor, ...]]:
    count = inputs[0].shape[0] // batch
    return [tuple(t[i * batch:(i + 1) * batch] for t in inputs) for i in range(count)]


def _run(graph: ModelGraph, batches: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Every output over every batch, concatenated along the batch axis."""
    outputs = [graph.run(b) for b in batches]
    return tuple(torch.cat([o[i] for o in outputs]) for i in range(len(outputs[0])))


def _per_row_cosine(reference: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    ref, out = reference.detach().double(), got.detach().double()
    ref, out = ref.reshape(ref.shape[0], -1, ref.shape[-1]), out.reshape(out.shape[0], -1, out.shape[-1])
    return torch.nn.functional.cosine_similarity(ref, out, dim=-1).mean(-1)
