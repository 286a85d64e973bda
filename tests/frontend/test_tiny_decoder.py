"""The zoo's ``tiny-decoder``: trained weights shipped in the package, loaded offline, and actually trained.

Approximate attention passes are judged on this model because its attention was trained; these tests fail
if the shipped weights are missing, random or broken: held-out perplexity must be far below the unigram
baseline, and attention far from uniform. The held-out text is the last 5 % of characters of
``corpus.running_text()``, the split ``benchmarks/train_tiny_decoder.py`` trains with.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
import torch

from tfcompile import corpus
from tfcompile.frontend import LoadOptions, load_model, zoo

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT / "tfcompile" / "frontend" / "weights" / "tiny_decoder"
HELDOUT_FRACTION = 0.05  # as in benchmarks/train_tiny_decoder.py
SEQ = 256
ROWS = 8  # held-out windows of SEQ bytes (the first 2 KiB of the held-out text): a slice, so it takes seconds
# Measured (CPython 3.11.7's text): 4.94 per byte on these 8 windows, 5.08 on all 81 held-out windows, against
# 23.1 for byte frequencies and 254 for the same model untrained. A ceiling of 8 leaves room for another
# CPython's text and another CPU's rounding while failing any untrained or broken model.
MAX_HELDOUT_PERPLEXITY = 8.0
UNIGRAM_FLOOR = 16.0  # the unigram baseline here is ~23: a ceiling of 8 is well under half of it
# Attention entropy over uniform attention's (log of the visible keys), per layer: 1.00 with random weights;
# measured 0.51, 0.69, 0.64, 0.68 (mean 0.63) on two held-out windows.
MAX_LAYER_ENTROPY_RATIO = 0.8
MAX_MEAN_ENTROPY_RATIO = 0.7


def heldout_rows(rows: int = ROWS, seq: int = SEQ) -> torch.Tensor:
    text = corpus.running_text()
    held = text[len(text) - int(len(text) * HELDOUT_FRACTION):].encode("utf-8")
    assert len(held) >= rows * seq
    return torch.tensor(list(held[: rows * seq]), dtype=torch.int64).view(rows, seq)


def perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return math.exp(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                      ids[:, 1:].reshape(-1)).item())


def unigram_perplexity(ids: torch.Tensor) -> float:
    """Byte frequencies of the training text, scored on ``ids`` (add-one smoothed)."""
    text = corpus.running_text()
    train = torch.tensor(list(text[: len(text) - int(len(text) * HELDOUT_FRACTION)].encode("utf-8")))
    counts = torch.bincount(train, minlength=256).double() + 1.0
    return math.exp(-(counts / counts.sum()).log()[ids].mean().item())


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return zoo.build("tiny-decoder").model


def test_weights_are_safetensors_in_fp16_and_load_as_fp32(model):
    from safetensors import safe_open

    names = {p.name for p in WEIGHTS.iterdir()}
    assert {"config.json", "model.safetensors"} <= names
    assert not any(Path(name).suffix in {".bin", ".pt", ".pth", ".pkl"} for name in names)  # never a pickle
    assert (WEIGHTS / "model.safetensors").stat().st_size < 4.2e6
    with safe_open(WEIGHTS / "model.safetensors", framework="pt") as stored:
        assert {stored.get_slice(key).get_dtype() for key in stored.keys()} == {"F16"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.vocab_size == 256


def test_package_data_ships_the_weights():
    """A non-editable install must carry the weights: pyproject's package-data globs match both files."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    base = ROOT / "tfcompile" / "frontend"
    shipped = {p for pattern in data.get("tfcompile.frontend", []) for p in base.glob(pattern)}
    assert {WEIGHTS / "config.json", WEIGHTS / "model.safetensors"} <= shipped


def test_config_cannot_be_overridden():
    with pytest.raises(ValueError, match="trained weights"):
        zoo.build("tiny-decoder", config_overrides={"n_layer": 1})


def test_heldout_perplexity_far_below_unigram_and_random(model):
    ids = heldout_rows()
    trained, unigram = perplexity(model, ids), unigram_perplexity(ids)
    assert unigram > UNIGRAM_FLOOR
    assert trained < MAX_HELDOUT_PERPLEXITY < unigram / 2, (trained, unigram)
    torch.manual_seed(0)
    random = type(model)(model.config).eval()  # same architecture, untrained: must fail the same bound
    assert perplexity(random, ids) > MAX_HELDOUT_PERPLEXITY * 10


def test_attention_is_far_from_uniform(model):
    ids = heldout_rows(rows=2)
    model.set_attn_implementation("eager")  # sdpa returns no attention weights
    try:
        with torch.no_grad():
            attentions = model(input_ids=ids, use_cache=False, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    visible = torch.arange(1, SEQ + 1, dtype=torch.float64)  # causal: query i sees i + 1 keys
    uniform = visible.log()[1:].mean().item()  # query 0 has one key and no choice
    ratios = []
    for weights in attentions:
        assert weights.shape[-2:] == (SEQ, SEQ)
        p = weights.double().clamp_min(1e-30)
        ratios.append(-(p * p.log()).sum(-1)[..., 1:].mean().item() / uniform)
    assert max(ratios) < MAX_LAYER_ENTROPY_RATIO and sum(ratios) / len(ratios) < MAX_MEAN_ENTROPY_RATIO, ratios


def test_traces_like_the_gpt2_zoo_entries():
    """Same inputs and outputs as gpt2-small (input_ids -> logits), byte ids, and the passes' view of it."""
    graph = load_model("tiny-decoder", LoadOptions(batch=1, seq=32))
    gpt2 = load_model("gpt2-small", LoadOptions(batch=1, seq=32, config_overrides={"n_layer": 1, "n_embd": 32,
                                                                                   "n_head": 2}))
    assert graph.input_names == gpt2.input_names == ["input_ids"]
    assert graph.output_names == gpt2.output_names
    assert graph.info["kind"] == "byte-decoder"  # a decoder whose tokens are bytes: judged on held-out bytes
    assert int(graph.example_inputs[0].max()) < 256
    assert graph.run()[0].shape == (1, 32, 256)


def test_optimize_judges_the_decoder_on_text_it_was_not_trained_on():
    from tfcompile import corpus
    from tfcompile.frontend import LoadOptions, load_model
    from tfcompile.knob_search.quality_data import QualitySplits

    graph = load_model("tiny-decoder", LoadOptions(batch=4, seq=64))
    heldout = corpus.decoder_heldout_bytes()
    assert graph.info["inputs"] == "real English text"
    assert bytes(graph.example_inputs[0][0].tolist()) in heldout
    splits = QualitySplits.for_graph(graph)
    rows = {bytes(row.tolist()) for split in (splits.calibration, splits.heldout) for (ids,) in split for row in ids}
    assert len(rows) == 32 + 64 and all(row in heldout for row in rows)  # every window distinct, all held out
    assert "never trained on" in splits.source
