"""Accumulating index_put on TVM adds every value (session 22): TVM's own legalisation raced.

``topi.index_put`` with ``accumulate=True`` ran ``out[index[k]] += values[k]`` as a parallel loop, so two
threads adding into one slot lost additions: in an ad-hoc run of the first test's model, counting 65536 ones
into two slots gave 20482 instead of 32726 in 22 of 50 runs on 2 threads. Token merging's group sums and
sizes are such scatters.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from tfcompile.backends.tvm import compile_graph, set_num_threads  # noqa: E402
from tfcompile.backends.tvm.lowering import legalize_and_fuse, import_graph, primfuncs  # noqa: E402
from tfcompile.backends.tvm.target import host_target, vector_lanes  # noqa: E402
from tfcompile.graph import export_module  # noqa: E402


class _Counts(torch.nn.Module):
    def forward(self, x, slots, ones):
        busy = x @ x  # keeps the thread pool's workers awake into the scatter, as in a model
        return busy, torch.zeros(2, dtype=ones.dtype).index_put((slots,), ones, accumulate=True)


class _GroupSums(torch.nn.Module):
    """Token merging's sums: rows [N, 1] and columns [1, H] broadcast to [N, H]; and negative slots."""

    def forward(self, rows, values):
        columns = torch.arange(values.shape[1]).unsqueeze(0)
        sums = torch.zeros(4, values.shape[1], dtype=values.dtype).index_put((rows, columns), values,
                                                                           accumulate=True)
        from_end = torch.zeros(4, dtype=values.dtype).index_put((rows.squeeze(1) - 4,), values[:, 0],
                                                                accumulate=True)
        return sums, from_end


def test_every_addition_lands_when_two_threads_count_into_the_same_slots():
    set_num_threads(2)
    draw = torch.Generator().manual_seed(0)
    inputs = (torch.randn(256, 256, generator=draw), torch.randint(0, 2, (65536,), generator=draw),
              torch.ones(65536))
    graph = export_module(_Counts(), inputs, name="counts")
    module = compile_graph(graph)
    expected = torch.bincount(inputs[1], minlength=2).float()
    for _ in range(50):
        assert torch.equal(module.run(inputs)[1], expected)


def test_broadcast_and_negative_indices_match_torch_and_accumulate_serially():
    draw = torch.Generator().manual_seed(1)
    inputs = (torch.randint(0, 4, (512, 1), generator=draw), torch.randn(512, 64, generator=draw))
    graph = export_module(_GroupSums(), inputs, name="group-sums")
    target = host_target()
    kernels = primfuncs(legalize_and_fuse(import_graph(graph), target, pad_multiple=vector_lanes(target)))
    scatters = [f.script() for name, f in kernels.items() if name.startswith("index_put")]
    assert scatters and all(text.count("T.parallel") == 1 for text in scatters)  # the copy only
    outputs = compile_graph(graph, schedule="rules").run(inputs)
    for out, ref in zip(outputs, _GroupSums()(inputs[0], inputs[1].double())):
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
