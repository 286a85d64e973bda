"""Hugging Face models the zoo does not name, of every modality, load from a directory with no hints.

Each model is built from a tiny config with seeded weights and saved the way a
user would hand it over (config.json + safetensors). The frontend has to find
its inputs (names, shapes, dtypes) and name its outputs from the model alone;
the traced graph must match eager, and the search must produce a variant.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from tfcompile.frontend import LoadOptions, load_model
from tfcompile.frontend.hf import io_spec, model_class_for
from tfcompile.optimize import OptimizeSettings, optimize

VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8)
WHISPER = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16,
               max_target_positions=32, vocab_size=100, pad_token_id=1, bos_token_id=2, eos_token_id=3,
               decoder_start_token_id=2)


def _clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(intermediate_size=64, **VISION))


def _dinov2():
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(mlp_ratio=2, **VISION))


def _swin():
    from transformers import SwinConfig, SwinModel

    return SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                window_size=4))


def _whisper_encoder():
    from transformers import WhisperConfig, WhisperModel

    return WhisperModel(WhisperConfig(**WHISPER)).get_encoder()


def _whisper():
    from transformers import WhisperConfig, WhisperModel

    return WhisperModel(WhisperConfig(**WHISPER))


def _wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    return Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                                        conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                        num_conv_pos_embedding_groups=4))


def _bert_with_pooler():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                vocab_size=100))


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2, vocab_size=128, max_position_embeddings=64))


# builder, the inputs found as (name, shape at batch 2 and seq 16, dtype), the outputs the model names
MODELS = {
    "clip-vision": (_clip_vision, [("pixel_values", (2, 3, 32, 32), torch.float32)],
                    ["last_hidden_state", "pooler_output"]),
    "dinov2": (_dinov2, [("pixel_values", (2, 3, 32, 32), torch.float32)], ["last_hidden_state", "pooler_output"]),
    "swin": (_swin, [("pixel_values", (2, 3, 32, 32), torch.float32)], ["last_hidden_state", "pooler_output"]),
    # Whisper accepts exactly max_source_positions x the conv stride (2) frames.
    "whisper-encoder": (_whisper_encoder, [("input_features", (2, 16, 32), torch.float32)], ["last_hidden_state"]),
    "whisper": (_whisper, [("input_features", (2, 16, 32), torch.float32), ("decoder_input_ids", (2, 16), torch.int64)],
                ["last_hidden_state", "encoder_last_hidden_state"]),
    # 16 frames of the feature extractor's 5 x 2 samples each.
    "wav2vec2": (_wav2vec2, [("input_values", (2, 160), torch.float32)], ["last_hidden_state", "extract_features"]),
    "bert-with-pooler": (_bert_with_pooler, [("input_ids", (2, 16), torch.int64),
                                             ("attention_mask", (2, 16), torch.int64)],
                         ["last_hidden_state", "pooler_output"]),
    "mixtral": (_mixtral, [("input_ids", (2, 16), torch.int64)], ["logits"]),
}


def _save(build, directory):
    torch.manual_seed(0)
    model = build().eval()
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("name", MODELS)
def test_model_traces_from_its_own_description(name, tmp_path):
    build, expected_inputs, expected_outputs = MODELS[name]
    model = _save(build, tmp_path / name)

    graph = load_model(str(tmp_path / name), LoadOptions(batch=2, seq=16))

    assert [(n, tuple(t.shape), t.dtype) for n, t in zip(graph.input_names, graph.example_inputs)] == expected_inputs
    assert graph.output_names == expected_outputs
    kwargs = dict(zip(graph.input_names, graph.example_inputs))
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    with torch.no_grad():
        eager = model(**kwargs)
    for field, traced in zip(expected_outputs, graph.run()):
        torch.testing.assert_close(traced, eager[field], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["clip-vision", "swin", "whisper-encoder", "mixtral"])
def test_model_optimizes(name, tmp_path):
    _save(MODELS[name][0], tmp_path / name)
    graph = load_model(str(tmp_path / name), LoadOptions(batch=1, seq=16))
    result = optimize(graph, OptimizeSettings(target="cpu"))
    result.cleanup()
    assert result.best is not None
    assert all(r.eligible for r in result.reports if r.exact)


def test_explicit_input_shape_wins(tmp_path):
    _save(_dinov2, tmp_path / "dinov2")
    graph = load_model(str(tmp_path / "dinov2"), LoadOptions(input_shapes={"pixel_values": (1, 3, 48, 48)}))
    assert tuple(graph.example_inputs[0].shape) == (1, 3, 48, 48)
    assert graph.example_inputs[0].dtype == torch.float32


def test_generative_lm_takes_ids_only_and_encoder_takes_a_mask():
    # Kept from the zoo's behaviour: decoders trace one unpadded forward, encoders get the mask --lengths pads.
    assert io_spec(_mixtral().eval()) == (["input_ids"], ["logits"])
    assert io_spec(_bert_with_pooler().eval())[0] == ["input_ids", "attention_mask"]


def test_class_outside_the_top_level_is_found_by_model_type():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig(**WHISPER)
    config.architectures = ["WhisperEncoder"]
    assert model_class_for(config) is WhisperEncoder


@pytest.mark.parametrize("name", ["mixtral", "swin"])
def test_model_optimizes_end_to_end_with_an_exported_model(name, tmp_path):
    """Mixtral's experts load as batched_mm (static shapes the ONNX exporter takes); Swin exports as is."""
    import tfcompile

    _save(MODELS[name][0], tmp_path / name)
    outcome = tfcompile.optimize_model(tmp_path / name, tmp_path / "out", load=LoadOptions(batch=1, seq=16))
    assert outcome.onnx_path.is_file()
    assert not [r for r in outcome.result.reports if r.rejected == "not lowered"]
    assert outcome.export.max_rel_err <= 1e-4 and len(outcome.export.checked_at) >= 3
