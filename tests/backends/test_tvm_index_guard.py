"""TVM's gathers and scatters stop at an index out of range, as torch does, instead of reaching past a tensor.

Each model takes its indices as an input, the way a hostile model could compute them from anything. Without
the guard TVM's kernels read (``take`` in ``fast`` mode, ``gather_elements``) or write (``index_put``,
``scatter_elements``) at whatever address the index gives.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from tfcompile.backends.tvm import compile_graph  # noqa: E402
from tfcompile.backends.tvm.lowering import import_graph, legalize_and_fuse  # noqa: E402
from tfcompile.backends.tvm.target import host_target  # noqa: E402
from tfcompile.errors import BackendError  # noqa: E402
from tfcompile.graph import export_module  # noqa: E402


class _Scatters(torch.nn.Module):
    def forward(self, slots, values):
        summed = torch.zeros(4, dtype=values.dtype).index_put((slots,), values, accumulate=True)
        placed = torch.zeros(4, dtype=values.dtype).index_put((slots,), values)
        return summed, placed


class _Embedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(16, 8)

    def forward(self, ids):
        return self.table(ids)


class _Elements(torch.nn.Module):
    def forward(self, x, index):
        return torch.gather(x, 1, index), torch.zeros_like(x).scatter(1, index, torch.ones_like(x[:, :2]))


class _Pairs(torch.nn.Module):
    """Advanced indexing with two index tensors: ``index_tensor``; negative indices count from the end."""

    def forward(self, x, rows, columns):
        return x[rows, columns], x[rows]


def _compiled(module: torch.nn.Module, inputs: tuple, name: str):
    return compile_graph(export_module(module, inputs, name=name), schedule="rules")


def _checks(module: torch.nn.Module, inputs: tuple, name: str) -> int:
    """How many times the lowered module calls an index check."""
    graph = export_module(module, inputs, name=name)
    return legalize_and_fuse(import_graph(graph), host_target())["main"].script().count("R.call_tir(index_check")


def test_a_scatter_out_of_range_raises_like_torch_and_writes_nothing_past_the_tensor():
    values = torch.arange(1.0, 4.0)
    good, bad = torch.tensor([0, 3, -1]), torch.tensor([0, 7, 1])
    module = _compiled(_Scatters(), (good, values), "scatters")
    for out, ref in zip(module.run((good, values)), _Scatters()(good, values)):
        torch.testing.assert_close(out, ref)
    with pytest.raises(IndexError):
        _Scatters()(bad, values)
    with pytest.raises(BackendError, match="index_put: an index is outside"):
        module.run((bad, values))
    with pytest.raises(BackendError, match="index_put: an index is outside"):
        module.run((torch.tensor([0, -5, 1]), values))
    # The module is intact after the refused run.
    for out, ref in zip(module.run((good, values)), _Scatters()(good, values)):
        torch.testing.assert_close(out, ref)


def test_an_embedding_id_past_the_table_raises_like_torch():
    torch.manual_seed(0)
    model = _Embedding().eval()
    ids = torch.tensor([[1, 15, 0]])
    module = _compiled(model, (ids,), "embedding")
    torch.testing.assert_close(module.run((ids,))[0], model(ids))
    huge = torch.tensor([[1, 1 << 20, 0]])
    with pytest.raises(IndexError):
        model(huge)
    with pytest.raises(BackendError, match="take: an index is outside"):
        module.run((huge,))


def test_gather_and_scatter_along_an_axis_refuse_an_index_out_of_range():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    good = torch.tensor([[0, 4], [2, 2], [1, 3]])
    module = _compiled(_Elements(), (x, good), "elements")
    for out, ref in zip(module.run((x, good)), _Elements()(x, good)):
        torch.testing.assert_close(out, ref)
    for bad in (torch.tensor([[0, 5], [2, 2], [1, 3]]), torch.tensor([[0, 1], [-1, 2], [1, 3]])):
        with pytest.raises(RuntimeError):
            _Elements()(x, bad)
        with pytest.raises(BackendError, match="an index is outside"):
            module.run((x, bad))


def test_advanced_indexing_counts_negative_indices_from_the_end_and_refuses_past_them():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    rows, columns = torch.tensor([0, -1, 3, -4]), torch.tensor([5, -6, 0, 2])
    module = _compiled(_Pairs(), (x, rows, columns), "pairs")
    for out, ref in zip(module.run((x, rows, columns)), _Pairs()(x, rows, columns)):
        torch.testing.assert_close(out, ref)
    for bad_rows, bad_columns in ((rows, torch.tensor([5, 6, 0, 2])), (torch.tensor([0, -5, 3, 1]), columns)):
        with pytest.raises(IndexError):
            _Pairs()(x, bad_rows, bad_columns)
        with pytest.raises(BackendError, match="an index is outside"):
            module.run((x, bad_rows, bad_columns))


def test_every_gather_and_scatter_of_computed_indices_has_a_check_and_constant_ones_have_none():
    slots = torch.tensor([0, 3, -1])
    assert _checks(_Scatters(), (slots, torch.ones(3)), "scatters") == 2

    class _ConstantRows(torch.nn.Module):
        def forward(self, x):
            return x.index_select(0, torch.tensor([2, 0]))

    assert _checks(_ConstantRows(), (torch.randn(3, 4),), "constant-rows") == 0


class _ExpandedGather(torch.nn.Module):
    """Token merging's gather: one slot per token, expanded over the channels."""

    def forward(self, x, slots):
        return torch.gather(x, 1, slots.expand(-1, -1, x.shape[-1]))


def test_indices_expanded_over_the_channels_are_checked_before_the_expand():
    x, slots = torch.randn(2, 6, 64), torch.tensor([[[5], [0], [2]], [[1], [1], [4]]])
    graph = export_module(_ExpandedGather(), (x, slots), name="expanded")
    script = legalize_and_fuse(import_graph(graph), host_target())["main"].script()
    checks = [line for line in script.splitlines() if "R.call_tir(index_check" in line]
    assert len(checks) == 1 and "R.Tensor((2, 3, 1)" in checks[0], checks  # [B, r, 1], not [B, r, C]
    module = compile_graph(graph, schedule="rules")
    torch.testing.assert_close(module.run((x, slots))[0], _ExpandedGather()(x, slots))
    with pytest.raises(BackendError, match="gather_elements: an index is outside"):
        module.run((x, torch.tensor([[[6], [0], [2]], [[1], [1], [4]]])))


def test_a_constant_index_out_of_range_is_refused_before_anything_is_built():
    class _PastTheEnd(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(3).index_put((torch.tensor([0, 9]),), x[:2], accumulate=True)

    x = torch.randn(4)
    with pytest.raises(BackendError, match="a constant index is outside"):
        compile_graph(export_module(_PastTheEnd(), (x,), name="past-the-end"), schedule="rules")
