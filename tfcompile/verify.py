"""Numerical verification of a variant against its original.

Both GraphModules run in torch on the same seeded inputs. Exact variants
report the largest absolute error and that error relative to the largest
reference magnitude (element-wise relative error is meaningless near zero).
Approximate variants report a quality figure: mean cosine similarity of
output vectors for embeddings and hidden states, top-1 agreement for logits.

For a right-padded batch (the workload's ``lengths``), outputs indexed by
token ([B, L, ...]) are compared at valid positions only: what a model
computes at padded positions is meaningless, and padding removal writes zeros
there.
"""

from __future__ import annotations

import dataclasses

import torch

from tfcompile.graph import ModelGraph
from tfcompile.structure import valid_mask


@dataclasses.dataclass(frozen=True)
class Verification:
    max_abs_err: float
    max_rel_err: float
    quality: float  # 1.0 for a perfect match
    quality_metric: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def valid_positions(outputs: tuple[torch.Tensor, ...], lengths: list[int] | None) -> tuple[torch.Tensor, ...]:
    """Zero every token-indexed output at padded positions."""
    if not lengths:
        return outputs
    batch = len(lengths)
    masked = []
    for out in outputs:
        if out.dim() >= 2 and out.shape[0] == batch and out.shape[1] >= max(lengths):
            keep = valid_mask(lengths, out.shape[1])
            out = out * keep.reshape(*keep.shape, *([1] * (out.dim() - 2))).to(out.dtype)
        masked.append(out)
    return tuple(masked)


def compare_outputs(reference: tuple[torch.Tensor, ...], candidate: tuple[torch.Tensor, ...],
                    output_names: list[str] | None = None, lengths: list[int] | None = None) -> Verification:
    if len(reference) != len(candidate):
        raise ValueError(f"output count differs: {len(reference)} vs {len(candidate)}")
    reference, candidate = valid_positions(reference, lengths), valid_positions(candidate, lengths)
    max_abs, max_rel = 0.0, 0.0
    for ref, got in zip(reference, candidate):
        if ref.shape != got.shape:
            raise ValueError(f"output shape differs: {tuple(ref.shape)} vs {tuple(got.shape)}")
        ref64, got64 = ref.detach().double(), got.detach().double()
        abs_err = (ref64 - got64).abs().max().item() if ref.numel() else 0.0
        scale = ref64.abs().max().item() if ref.numel() else 0.0
        max_abs = max(max_abs, abs_err)
        max_rel = max(max_rel, abs_err / scale if scale > 0 else abs_err)
    metric, quality = _quality(reference[0], candidate[0], (output_names or ["output"])[0])
    return Verification(max_abs, max_rel, quality, metric)


def _quality(ref: torch.Tensor, got: torch.Tensor, name: str) -> tuple[str, float]:
    ref64, got64 = ref.detach().double(), got.detach().double()
    if name == "logits" and ref.dim() >= 2:
        agree = (ref64.argmax(-1) == got64.argmax(-1)).double().mean().item()
        return "top1_agreement", agree
    flat_ref = ref64.reshape(-1, ref64.shape[-1]) if ref64.dim() else ref64.reshape(1, 1)
    flat_got = got64.reshape(-1, got64.shape[-1]) if got64.dim() else got64.reshape(1, 1)
    # Rows zero in both are padded positions masked by valid_positions: no vectors to compare, so they are left
    # out (their cosine would read 0 and pull the mean down to the share of valid tokens).
    compared = (flat_ref != 0).any(-1) | (flat_got != 0).any(-1)
    if not compared.any():
        return "mean_cosine", 1.0
    cosine = torch.nn.functional.cosine_similarity(flat_ref[compared], flat_got[compared], dim=-1).mean().item()
    return "mean_cosine", cosine


def verify(original: ModelGraph, variant: ModelGraph, reference_outputs: tuple[torch.Tensor, ...] | None = None,
           *, lengths: tuple[int, ...] | list[int] | None = None) -> Verification:
    """``lengths``: the valid lengths of a right-padded batch (the workload's), compared at valid positions only."""
    reference = reference_outputs if reference_outputs is not None else original.run()
    return compare_outputs(reference, variant.run(original.example_inputs), original.output_names,
                           lengths=list(lengths) if lengths else None)
