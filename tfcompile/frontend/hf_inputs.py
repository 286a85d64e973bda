"""Which inputs a transformers model takes, and of what shape and dtype, read from the model itself.

A class name says little about inputs: CLIPVisionModel, Dinov2Model, SwinModel
and WhisperEncoder match no naming pattern, and guessing token ids for them
ends in a trace error deep inside the model. Everything here comes from what
the model declares instead, so any modality works without model-specific code:

- which inputs: the class's ``main_input_name``, any forward parameter without
  a default, an ``attention_mask`` for token encoders (not for generative LMs:
  one full unpadded forward needs no mask, and the zoo's decoders never had
  one) and ``decoder_input_ids`` for encoder-decoder models;
- shapes: ``(batch, seq)`` for token ids (decoder ids at most the decoder's
  ``max_target_positions``); ``(batch, channels, H, W)`` for
  pixels from the config's ``num_channels`` and ``image_size`` (with
  ``num_frames`` for video); ``(batch, num_mel_bins, frames)`` for mel
  features, where an encoder with ``max_source_positions`` gets exactly the
  frame count its convolution strides map onto those positions (Whisper checks
  it); ``(batch, samples)`` for raw audio, ``seq`` frames of the feature
  extractor's total ``conv_stride``;
- dtypes: ids and masks int64, pixels and audio in the model's float dtype.

``None`` from ``input_shape`` means the model does not say; the caller falls
back to ``(batch, seq)`` or asks for ``--input-shape``.
"""

from __future__ import annotations

import inspect
import math

import torch

# Inputs that carry signal values rather than indices.
FLOAT_INPUTS = ("pixel_values", "input_features", "input_values", "inputs_embeds")
# Sequence length of the one small forward that finds a model's output fields.
PROBE_SEQ = 8


def input_names(model: torch.nn.Module) -> list[str]:
    """The inputs a forward of ``model`` needs, main input first."""
    parameters = forward_parameters(model)
    main = getattr(model, "main_input_name", None) or "input_ids"
    names = [main]
    names += [name for name, p in parameters.items() if p.default is inspect.Parameter.empty and name not in names]
    if main == "input_ids" and "attention_mask" in parameters and not _generates(model):
        names.append("attention_mask")
    if getattr(_config(model), "is_encoder_decoder", False) and "decoder_input_ids" in parameters:
        names.append("decoder_input_ids")
    return names


def forward_parameters(model: torch.nn.Module) -> dict[str, inspect.Parameter]:
    """Named parameters of ``model.forward`` (no ``*args``/``**kwargs``)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {name: p for name, p in parameters.items()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def input_shape(model: torch.nn.Module | None, name: str, batch: int, seq: int) -> tuple[int, ...] | None:
    """The shape of input ``name`` at this batch and sequence length, or None when the model does not say."""
    config = _config(model)
    if name == "pixel_values":
        return _pixel_shape(config, batch)
    if name == "input_features":
        return _feature_shape(model, config, batch, seq)
    if name == "input_values":
        strides = _config_value(config, "conv_stride")
        return (batch, seq * math.prod(strides)) if _is_int_sequence(strides) else (batch, seq)
    if name == "decoder_input_ids":
        limit = _config_value(config, "max_target_positions")
        return (batch, min(seq, limit) if isinstance(limit, int) and limit > 0 else seq)
    if name.endswith("_ids") or "mask" in name.lower():
        return (batch, seq)
    return None


def input_dtype(model: torch.nn.Module | None, name: str) -> torch.dtype:
    """int64 for ids and masks; the model's own floating dtype for pixels, audio and embeddings."""
    if name not in FLOAT_INPUTS:
        return torch.int64
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def probe_seq(model: torch.nn.Module) -> int:
    """A short sequence the model's positions allow, for the forward that finds its outputs."""
    config = _config(model)
    limits = [v for v in (getattr(config, k, None) for k in ("n_positions", "max_position_embeddings"))
              if isinstance(v, int) and v > 0]
    return min([PROBE_SEQ, *limits])


def tensor_fields(output) -> list[str]:
    """The names of the tensors in a transformers ModelOutput, in the order the model returns them."""
    if not hasattr(output, "items"):
        return []
    return [key for key, value in output.items() if isinstance(value, torch.Tensor)]


def _generates(model: torch.nn.Module) -> bool:
    can_generate = getattr(model, "can_generate", None)
    try:
        return bool(can_generate()) if callable(can_generate) else False
    except Exception:  # a remote-code model's own can_generate may raise anything; it then counts as an encoder
        return False


def _config(model: torch.nn.Module | None):
    return getattr(model, "config", None)


def _config_value(config, key: str):
    """``key`` from the config, or from its vision/audio sub-config (composite models keep sizes there)."""
    value = getattr(config, key, None)
    if value is not None:
        return value
    for sub in ("vision_config", "audio_config", "encoder_config"):
        value = getattr(getattr(config, sub, None), key, None)
        if value is not None:
            return value
    return None


def _pixel_shape(config, batch: int) -> tuple[int, ...]:
    size = _config_value(config, "image_size") or 224
    height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    channels = _config_value(config, "num_channels") or 3
    frames = _config_value(config, "num_frames")
    if isinstance(frames, int) and frames > 0:  # video: (batch, frames, channels, H, W)
        return (batch, frames, channels, height, width)
    return (batch, channels, height, width)


def _feature_shape(model, config, batch: int, seq: int) -> tuple[int, ...] | None:
    mel_bins = _config_value(config, "num_mel_bins")
    if isinstance(mel_bins, int):
        positions = _config_value(config, "max_source_positions")
        frames = positions * _conv1d_stride(model) if isinstance(positions, int) and positions > 0 else seq
        return (batch, mel_bins, frames)
    per_channel = _config_value(config, "input_feat_per_channel")
    if isinstance(per_channel, int):  # Speech2Text: (batch, frames, features)
        return (batch, seq, per_channel * (_config_value(config, "input_channels") or 1))
    return None


def _conv1d_stride(model) -> int:
    """How many input frames one encoder position covers: the product of the Conv1d strides before it."""
    if model is None:
        return 1
    return math.prod(m.stride[0] for m in model.modules() if isinstance(m, torch.nn.Conv1d))


def _is_int_sequence(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, int) and v > 0 for v in value)
