"""Hugging Face models: from configs (zoo), from a local directory, from a state dict.

Every model is wrapped so that ``forward`` takes tensors positionally and
returns a tuple of tensors, which is what torch.export, ONNX and TVM want.
Nothing here touches the network: directories are read with
``local_files_only=True`` and configs are built in code.
"""

from __future__ import annotations

import importlib
import os
import re
import pickle
from pathlib import Path

import torch

from tfcompile.errors import ModelLoadError, first_line
from tfcompile.frontend import hf_inputs

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
    """Adapts a Hugging Face model to ``forward(*tensors) -> tuple[tensors]``.

    ``output_fields`` names the ModelOutput fields returned, in order; empty
    returns every tensor the model returns (unnamed).
    """

    def __init__(self, model: torch.nn.Module, input_names: list[str], output_fields: list[str],
                 pooling: str | None = None):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output_fields = list(output_fields)
        self.pooling = pooling

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs = dict(zip(self.input_names, tensors))
        out = self.model_output(*tensors)
        if self.pooling == "mean":
            # sentence-transformers: masked mean over tokens, then L2 normalisation.
            hidden = out.last_hidden_state
            mask = kwargs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
            return (torch.nn.functional.normalize(pooled, p=2.0, dim=1),)
        if self.output_fields:
            return tuple(getattr(out, field) for field in self.output_fields)
        if isinstance(out, torch.Tensor):
            return (out,)
        return tuple(out[field] for field in hf_inputs.tensor_fields(out))

    def model_output(self, *tensors: torch.Tensor):
        """What the wrapped model returns for these inputs (a ModelOutput for transformers models)."""
        kwargs = dict(zip(self.input_names, tensors))
        if "use_cache" in hf_inputs.forward_parameters(self.model):
            kwargs["use_cache"] = False  # a KV cache in the outputs is not a pytree torch.export can trace
        return self.model(**kwargs)


def io_spec(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Input names and output fields of a transformers model, from its forward, config and outputs.

    See ``hf_inputs`` for the inputs. The output fields are the tensors one
    small forward returns (``last_hidden_state``, ``pooler_output``,
    ``logits``, ...), so they are named as the model names them.
    """
    names = hf_inputs.input_names(model)
    return names, output_fields(model, names)


def output_fields(model: torch.nn.Module, input_names: list[str]) -> list[str]:
    """The tensor fields ``model`` returns, from one forward at batch 1 and a few tokens.

    Empty when that forward cannot be run from the model's own description
    (an input it does not size, or a forward that needs more): the wrapper then
    returns every tensor unnamed, and tracing at the user's ``--input-shape``
    still works.
    """
    seq = hf_inputs.probe_seq(model)
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for name in input_names:
        shape = hf_inputs.input_shape(model, name, 1, seq)
        if shape is None:
            return []
        dtype = hf_inputs.input_dtype(model, name)
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            inputs.append(torch.ones(shape, dtype=dtype))  # id 1 and a mask of ones fit every vocabulary
    try:
        with torch.no_grad():
            out = TensorIO(model, input_names, []).model_output(*inputs)
    except Exception:  # whatever the model raises here, tracing raises again with the user's shapes, or not
        return []
    return hf_inputs.tensor_fields(out)


def model_class_for(config, source: Path | None = None) -> type:
    """The transformers model class the config's ``architectures`` names (AutoModel if none).

    Only model classes: a config is input, and ``getattr(transformers, name)`` reaches
    any public function or class of the library. Classes the library does not
    export at its top level (``WhisperEncoder``) are looked up in the modeling
    module of the config's ``model_type``.
    """
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = None
        if isinstance(arch, str):
            cls = getattr(transformers, arch, None) or _modeling_class(config, arch)
        if cls is None:
            continue
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ModelLoadError(f"{source or 'config'}: architectures names {arch!r}, which is not a transformers "
                                 "model class (e.g. GPT2LMHeadModel, BertModel)")
        return cls
    return transformers.AutoModel


MODEL_TYPE_PATTERN = re.compile(r"[a-z][a-z0-9_-]*")


def _modeling_class(config, name: str) -> type | None:
    """``name`` from ``transformers.models.<model_type>.modeling_<model_type>``, or None."""
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str) or not MODEL_TYPE_PATTERN.fullmatch(model_type) or not name.isidentifier():
        return None
    module_name = model_type.replace("-", "_")
    try:
        module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    except ImportError:
        return None
    return getattr(module, name, None)


# How transformers should run the layers it has several implementations of. SDPA: one attention op the
# passes and exporters know. batched_mm for mixture-of-experts layers: each routed token's expert weights
# gathered and multiplied in one bmm, a graph of static shapes that torch.onnx exports; the default
# (grouped_mm's CPU fallback) is an opaque custom op with a per-expert loop that it cannot export.
IMPLEMENTATIONS = {"attn_implementation": "sdpa", "experts_implementation": "batched_mm"}


def load_directory(path: Path) -> torch.nn.Module:
    import transformers

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: a model directory needs a config.json (Hugging Face layout)")
    try:
        # Code named by the config (auto_map) is never run; False refuses at once instead of asking on stdout.
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, TypeError... on a bad config
        raise ModelLoadError(f"{path}/config.json: not a usable Hugging Face config: {first_line(exc)}") from exc
    if getattr(config, "auto_map", None):
        raise ModelLoadError(f"{path}/config.json names custom model code (auto_map); tfcompile never runs code "
                             "from a model directory: if you trust it, import it in a module:factory of your own")
    cls = model_class_for(config, path / "config.json")
    try:
        model, loading = cls.from_pretrained(path, local_files_only=True, output_loading_info=True,
                                             **IMPLEMENTATIONS)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(f"{path}: a checkpoint in it is a pickle that names more than tensors; tfcompile reads "
                             "Hugging Face checkpoints only with the weights-only unpickler (convert it to "
                             "safetensors)") from exc
    except Exception as exc:  # weights that do not fit, truncated safetensors, missing files: all input faults
        raise ModelLoadError(f"{path}: not a loadable Hugging Face model directory: {type(exc).__name__}: "
                             f"{first_line(exc)}") from exc
    _check_weights_fit(path, cls, loading)
    return model.eval()


def _check_weights_fit(path: Path, cls: type, loading: dict) -> None:
    """transformers fills missing weights with random values and drops ones it has no place for, with a
    warning: a model that computes something else than the files say. Both are the input's fault."""
    for kind, what in (("missing_keys", "has no weights for"), ("mismatched_keys", "has weights of another shape "
                       "for"), ("unexpected_keys", "has weights that the config has no place for, e.g.")):
        keys = sorted(str(k) for k in loading.get(kind) or ())
        if keys:
            raise ModelLoadError(f"{path}: the weights do not fit {cls.__name__} as config.json describes it: it "
                                 f"{what} {keys[0]} ({len(keys)} in all)")


def build_from_config(config_path: Path, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A model for a bare state dict, built from the config.json that describes it."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(config_path.parent if config_path.name == "config.json"
                                                         else config_path, local_files_only=True,
                                                         trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, TypeError... on a bad config
        raise ModelLoadError(f"{config_path}: not a Hugging Face config: {first_line(exc)}") from exc
    cls = model_class_for(config, config_path)
    try:
        if cls is transformers.AutoModel:
            model = cls.from_config(config, **IMPLEMENTATIONS)
        else:
            model = cls._from_config(config, **IMPLEMENTATIONS)
    except Exception as exc:  # absurd or inconsistent sizes in the config
        raise ModelLoadError(f"{config_path}: cannot build {cls.__name__} from this config: {type(exc).__name__}: "
                             f"{first_line(exc)}") from exc
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # "size mismatch for ...": the weights are of another model size
        raise ModelLoadError(f"state dict does not fit {cls.__name__} from {config_path}: "
                             f"{_first_mismatch(exc)}") from exc
    if missing:
        raise ModelLoadError(f"state dict does not fit {cls.__name__} from {config_path}: "
                             f"{len(missing)} missing tensors, e.g. {missing[0]}")
    if unexpected:
        raise ModelLoadError(f"state dict does not fit {cls.__name__} from {config_path}: "
                             f"{len(unexpected)} unexpected tensors, e.g. {unexpected[0]}")
    return model.eval()


def _first_mismatch(exc: RuntimeError) -> str:
    """load_state_dict lists every mismatch on its own line after a header; the first one says enough."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    details = [line for line in lines if line.startswith("size mismatch")]
    return (details[0] + (f" (and {len(details) - 1} more)" if len(details) > 1 else "")) if details \
        else first_line(exc)


def max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None
