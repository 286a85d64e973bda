"""Hugging Face models: from configs (zoo), from a local directory, from a state dict.

Every model is wrapped so that ``forward`` takes tensors positionally and
returns a tuple of tensors, which is what torch.export, ONNX and TVM want.
Nothing here touches the network: directories are read with
``local_files_only=True`` and configs are built in code.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch

from tfcompile.errors import ModelLoadError, first_line

# Transformers must never try the hub from inside tfcompile.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def quiet_transformers() -> None:
    """Transformers' load reports and config warnings would drown tfcompile's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class TensorIO(torch.nn.Module):
    """Adapts a Hugging Face model to ``forward(*tensors) -> tuple[tensors]``."""

    def __init__(self, model: torch.nn.Module, input_names: list[str], output_fields: list[str],
                 pooling: str | None = None):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output_fields = list(output_fields)
        self.pooling = pooling

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs = dict(zip(self.input_names, tensors))
        if "use_cache" in inspect.signature(self.model.forward).parameters:
            kwargs["use_cache"] = False  # a KV cache in the outputs is not a pytree torch.export can trace
        out = self.model(**kwargs)
        if self.pooling == "mean":
            # sentence-transformers: masked mean over tokens, then L2 normalisation.
            hidden = out.last_hidden_state
            mask = kwargs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
            return (torch.nn.functional.normalize(pooled, p=2.0, dim=1),)
        return tuple(getattr(out, field) for field in self.output_fields)


def io_spec(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Input names and output fields for a transformers model class."""
    name = type(model).__name__
    if "ImageClassification" in name:
        return ["pixel_values"], ["logits"]
    if name.startswith("ViT"):
        return ["pixel_values"], ["last_hidden_state"]
    if "CausalLM" in name or "LMHead" in name:
        return ["input_ids"], ["logits"]
    if "SequenceClassification" in name:
        return ["input_ids", "attention_mask"], ["logits"]
    return ["input_ids", "attention_mask"], ["last_hidden_state"]


def model_class_for(config) -> type:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_directory(path: Path) -> torch.nn.Module:
    import transformers

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: a model directory needs a config.json (Hugging Face layout)")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        cls = model_class_for(config)
        model = cls.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a loadable Hugging Face model directory: {first_line(exc)}") from exc
    return model.eval()


def build_from_config(config_path: Path, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A model for a bare state dict, built from the config.json that describes it."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(config_path.parent if config_path.name == "config.json"
                                                         else config_path, local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_path}: not a Hugging Face config: {first_line(exc)}") from exc
    cls = model_class_for(config)
    if cls is transformers.AutoModel:
        model = cls.from_config(config, attn_implementation="sdpa")
    else:
        model = cls._from_config(config, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing:
        raise ModelLoadError(f"state dict does not fit {cls.__name__} from {config_path}: "
                             f"{len(missing)} missing tensors, e.g. {missing[0]}")
    if unexpected:
        raise ModelLoadError(f"state dict does not fit {cls.__name__} from {config_path}: "
                             f"{len(unexpected)} unexpected tensors, e.g. {unexpected[0]}")
    return model.eval()


def max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None
