"""Norm fusion passes: fuse_norm, fold_norm_affine, layernorm_to_rmsnorm, rmsnorm_to_crmsnorm."""

import functools

import pytest
import torch
import torch.nn.functional as F

from tfcompile.graph import ModelGraph, clone, export_module, fetch_attr
from tfcompile.passes import apply_pass, norm
from tfcompile import structure
from tfcompile.verify import compare_outputs
from tests.passes.helpers import assert_rewrite_preserves, to_float64
from tests.tiny import load_tiny

aten = torch.ops.aten
FP32_TOL, FP64_TOL = 1e-5, 1e-12
CHAIN = ["fold_norm_affine", "layernorm_to_rmsnorm", "rmsnorm_to_crmsnorm"]
PRE_LN = ["gpt2-small", "vit-base", "manual-ln"]


# --------------------------------------------------------------------------- models

class _Norm(torch.nn.Module):
    """A LayerNorm written out in one of the styles models use."""

    def __init__(self, d, style):
        super().__init__()
        self.style = style
        self.weight = torch.nn.Parameter(1 + 0.5 * torch.randn(d))
        self.bias = torch.nn.Parameter(0.5 * torch.randn(d))

    def forward(self, x):
        if self.style == "torch":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, 1e-5)
        mu = x.mean(-1, keepdim=True)
        if self.style == "sub-pow":
            xc = x - mu
            return xc * torch.rsqrt((xc ** 2).mean(-1, keepdim=True) + 1e-5) * self.weight + self.bias
        if self.style == "twice":  # x − μ traced as two identical nodes
            return (x - mu) * torch.rsqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5) * self.weight + self.bias
        return (x - mu) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5) * self.weight + self.bias


class _Block(torch.nn.Module):
    def __init__(self, d, heads, style, sandwich):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = _Norm(d, style), _Norm(d, style)
        self.post = _Norm(d, "torch") if sandwich else None
        self.qkv, self.out = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, -1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        a = self.out(a)
        x = x + (self.post(a) if self.post is not None else a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyPreLN(torch.nn.Module):
    """A Pre-LN decoder whose norms can be hand-written arithmetic, with the
    variations the stream analysis must refuse (sandwich norm, tap, injected input)."""

    def __init__(self, styles=("sub-pow", "var"), final="twice", d=32, vocab=50, seq=8,
                 sandwich=False, tap=False, inject=False):
        super().__init__()
        self.tap, self.inject = tap, inject
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(seq, d))
        self.blocks = torch.nn.ModuleList(_Block(d, 4, s, sandwich) for s in styles)
        self.lnf = _Norm(d, final)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids, extra=None):
        x = self.emb(ids) + self.pos
        if self.inject:
            x = x + extra
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.lnf(x))
        return (logits, x) if self.tap else logits


def _export_tiny(seed=0, **kw) -> ModelGraph:
    torch.manual_seed(seed)
    model = TinyPreLN(**kw)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(seed))
    inputs = (ids, torch.randn(2, 8, 32)) if kw.get("inject") else (ids,)
    return export_module(model, inputs, name="tiny-preln")


def _randomise_vectors(graph: ModelGraph, seed: int = 1) -> ModelGraph:
    """HF initialises γ=1, β=0 and zero biases, which would make folding and
    centring trivially exact: give every 1-d weight/bias random values
    (new attributes on this freshly loaded graph, never an in-place write)."""
    gen = torch.Generator().manual_seed(seed)
    for node in graph.nodes("get_attr"):
        prefix, _, leaf = node.target.rpartition(".")
        value = fetch_attr(graph.gm, node.target)
        if leaf not in ("weight", "bias") or value.dim() != 1 or not value.is_floating_point():
            continue
        noise = 0.5 * torch.randn(value.shape, generator=gen, dtype=value.dtype)
        new = noise + 1 if leaf == "weight" else noise
        owner = graph.gm.get_submodule(prefix) if prefix else graph.gm
        if leaf in owner._parameters:
            setattr(owner, leaf, torch.nn.Parameter(new, requires_grad=False))
        else:
            setattr(owner, leaf, new)
    return graph


def _fresh(name: str) -> ModelGraph:
    if name == "manual-ln":
        graph, _ = apply_pass(_export_tiny(), "fuse_norm")
        return graph
    return _randomise_vectors(load_tiny(name))


@functools.lru_cache(maxsize=None)
def _model(name: str) -> ModelGraph:
    """Shared across tests: passes never mutate their input."""
    return _fresh(name)


def _ops(graph, target):
    return [n for n in graph.call_nodes() if n.target is target]


def _stream_values(graph: ModelGraph) -> dict[torch.fx.Node, torch.Tensor]:
    nodes = set(structure.residual_stream(graph).nodes)
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in nodes:
                values[n] = out
            return out

    with torch.no_grad():
        Recorder(graph.gm).run(*graph.example_inputs)
    assert len(values) == len(nodes) > 0
    return values


def _worst_relative_mean(values) -> float:
    """max over stream nodes and tokens of |mean over the model axis| / rms."""
    worst = 0.0
    for v in values.values():
        v = v.double()
        worst = max(worst, (v.mean(-1).abs() / v.pow(2).mean(-1).sqrt()).max().item())
    return worst


# --------------------------------------------------------------------------- exactness, one pass at a time

@pytest.mark.parametrize("name", ["gpt2-small", "vit-base"])
def test_fold_norm_affine_is_exact(name):
    graph = _model(name)
    folded = assert_rewrite_preserves(graph, "fold_norm_affine", rel_tol=FP32_TOL)
    assert all(not s.has_affine for s in structure.norm_sites(folded))
    # The folding did change the weights (γ, β are random), so the comparison tested something.
    assert compare_outputs(graph.run(), folded.run(graph.example_inputs)).max_abs_err > 0


def test_fold_unties_gpt2_head_from_its_embedding():
    graph = _model("gpt2-small")
    folded, _ = apply_pass(graph, "fold_norm_affine")
    (emb, *_), head = _ops(folded, aten.embedding.default), _ops(folded, aten.linear.default)[-1]
    assert emb.args[0].target == "model.lm_head.weight"  # the table itself is untouched
    assert head.args[1].target != "model.lm_head.weight"
    assert head.args[2] is not None  # β became the head's bias


@pytest.mark.parametrize("name", ["gpt2-small", "vit-base"])
def test_layernorm_to_rmsnorm_alone_is_exact(name):
    graph = _model(name)
    rms = assert_rewrite_preserves(graph, "layernorm_to_rmsnorm", rel_tol=FP32_TOL)
    assert not _ops(rms, aten.layer_norm.default)
    assert len(_ops(rms, aten.rms_norm.default)) == len(_ops(graph, aten.layer_norm.default))


@pytest.mark.parametrize("name", PRE_LN)
def test_chain_is_exact_in_fp32(name):
    graph = _model(name)
    reference, current = graph.run(), graph
    stream = {n.name for n in structure.residual_stream(graph).nodes}
    for pass_name in CHAIN:
        current, outcome = apply_pass(current, pass_name)
        assert outcome.applied, f"{pass_name}: {outcome.reason}"
        err = compare_outputs(reference, current.run(graph.example_inputs)).max_rel_err
        assert err <= FP32_TOL, f"{name} after {pass_name}: {err:.2e}"
    d = structure.norm_sites(graph)[0].dim
    widths = {structure.tensor_meta(n).shape[-1] for n in current.call_nodes() if n.name in stream}
    assert widths == {d - 1}
    assert not _ops(current, aten.rms_norm.default) and not _ops(current, aten.layer_norm.default)


@pytest.mark.parametrize("name", ["gpt2-small", "vit-base", "manual-ln"])
def test_chain_is_exact_in_fp64(name):
    graph, _ = apply_pass(_fresh(name), "remove_identity_ops")
    graph = to_float64(graph)
    for pass_name in CHAIN:
        graph = assert_rewrite_preserves(graph, pass_name, rel_tol=FP64_TOL)


def test_crms_rewrites_hard_coded_views_in_gpt2():
    graph = _model("gpt2-small")
    for pass_name in CHAIN:
        graph, _ = apply_pass(graph, pass_name)
    sizes = [n.args[1] for n in _ops(graph, aten.view.default)]
    assert [-1, 63] in sizes and [2, 16, 63] in sizes and [-1, 16, 63] in sizes
    assert [-1, 64] in sizes  # the attention output before c_proj is not the stream


# --------------------------------------------------------------------------- centring

@pytest.mark.parametrize("name", ["gpt2-small", "vit-base"])
def test_stream_is_zero_mean_after_centring(name):
    graph = _model(name)
    assert _worst_relative_mean(_stream_values(graph)) > 1e-2  # the check can fail
    rms, _ = apply_pass(graph, "layernorm_to_rmsnorm")
    assert _worst_relative_mean(_stream_values(rms)) < 1e-5


@pytest.mark.parametrize("name", ["gpt2-small", "vit-base"])
def test_rmsnorm_without_centring_is_detected_as_wrong(name):
    graph = _model(name)
    wrong = clone(graph)
    assert norm.swap_layernorms(wrong) == len(_ops(graph, aten.layer_norm.default))
    wrong.gm.recompile()
    check = compare_outputs(graph.run(), wrong.run(graph.example_inputs))
    assert check.max_rel_err > 100 * FP32_TOL


# --------------------------------------------------------------------------- fuse_norm

def test_fuse_norm_on_llama_is_exact():
    graph = load_tiny("llama-tiny")
    fused = assert_rewrite_preserves(graph, "fuse_norm", rel_tol=FP32_TOL)
    assert len(_ops(fused, aten.rms_norm.default)) == 5  # 2 layers × 2 + final
    assert not _ops(fused, aten.rsqrt.default)


def test_fuse_norm_on_llama_is_exact_in_fp64():
    graph, _ = apply_pass(_randomise_vectors(load_tiny("llama-tiny")), "remove_identity_ops")
    graph = to_float64(graph)
    fused = assert_rewrite_preserves(graph, "fuse_norm", rel_tol=FP64_TOL)
    # Folding γ into q/k/v, gate/up and lm_head works on RMSNorm too.
    assert_rewrite_preserves(fused, "fold_norm_affine", rel_tol=FP64_TOL)


def test_fuse_norm_matches_hand_written_layernorms():
    graph = _export_tiny()
    assert not _ops(graph, aten.layer_norm.default)
    fused = assert_rewrite_preserves(graph, "fuse_norm", rel_tol=FP32_TOL)
    assert len(_ops(fused, aten.layer_norm.default)) == 5
    assert not _ops(fused, aten.rsqrt.default) and not _ops(fused, aten.sqrt.default)
    graph64, _ = apply_pass(_export_tiny(), "remove_identity_ops")
    assert_rewrite_preserves(to_float64(graph64), "fuse_norm", rel_tol=FP64_TOL)


def test_fuse_norm_refuses_without_decomposed_norms():
    _, outcome = apply_pass(_model("gpt2-small"), "fuse_norm")
    assert not outcome.applied and "no RMSNorm/LayerNorm written out" in outcome.reason


# --------------------------------------------------------------------------- refusals

def test_llama_already_uses_rmsnorm():
    graph = load_tiny("llama-tiny")
    _, outcome = apply_pass(graph, "layernorm_to_rmsnorm")
    assert not outcome.applied and "already uses RMSNorm" in outcome.reason
    fused, _ = apply_pass(graph, "fuse_norm")
    _, outcome = apply_pass(fused, "layernorm_to_rmsnorm")
    assert "already uses RMSNorm" in outcome.reason
    folded, _ = apply_pass(fused, "fold_norm_affine")
    _, outcome = apply_pass(folded, "rmsnorm_to_crmsnorm")
    assert not outcome.applied and "not zero-mean" in outcome.reason


@pytest.mark.parametrize("name", ["bert-base", "minilm"])
def test_post_ln_is_refused(name):
    graph = load_tiny(name)
    same, outcome = apply_pass(graph, "layernorm_to_rmsnorm")
    assert same is graph and not outcome.applied
    assert "Post-LN" in outcome.reason and "feeds the residual add" in outcome.reason
    _, outcome = apply_pass(graph, "fold_norm_affine")
    assert not outcome.applied and "not by a linear layer" in outcome.reason


@pytest.mark.parametrize("variant, reason", [
    (dict(sandwich=True), "Peri/sandwich norm"),
    (dict(tap=True), "raw-stream tap"),
    (dict(inject=True), "model input"),
])
def test_stream_preconditions_are_checked(variant, reason):
    graph = _export_tiny(styles=("torch", "torch"), final="torch", **variant)
    _, outcome = apply_pass(graph, "layernorm_to_rmsnorm")
    assert not outcome.applied and reason in outcome.reason, outcome.reason


def test_crms_requires_folded_affine_and_rmsnorm():
    graph = _model("gpt2-small")
    _, outcome = apply_pass(graph, "rmsnorm_to_crmsnorm")
    assert "run layernorm_to_rmsnorm first" in outcome.reason
    rms, _ = apply_pass(graph, "layernorm_to_rmsnorm")
    _, outcome = apply_pass(rms, "rmsnorm_to_crmsnorm")
    assert not outcome.applied and "run fold_norm_affine first" in outcome.reason
    # RMSNorm keeps γ and β: folding afterwards still works and stays exact.
    folded = assert_rewrite_preserves(rms, "fold_norm_affine", rel_tol=FP32_TOL)
    assert all(not s.has_affine for s in structure.norm_sites(folded))
    assert not any(a.target is aten.rms_norm.default for n in _ops(folded, aten.add.Tensor) for a in n.args
                   if isinstance(a, torch.fx.Node))


def test_fold_refuses_when_nothing_is_left():
    folded, _ = apply_pass(_model("vit-base"), "fold_norm_affine")
    _, outcome = apply_pass(folded, "fold_norm_affine")
    assert not outcome.applied and "no norm has an affine" in outcome.reason


# --------------------------------------------------------------------------- lowering

def test_exact_norm_variant_runs_in_onnx_runtime(tmp_path):
    # aten.rms_norm becomes ONNX RMSNormalization only from opset 23; at the
    # default opset the exporter decomposes it (Pow/ReduceMean/Sqrt/Reciprocal).
    onnx = pytest.importorskip("onnx")
    from tfcompile.backends.ort import OrtModel, export_onnx

    graph = _model("gpt2-small")
    variant = graph
    for pass_name in CHAIN[:2]:
        variant, _ = apply_pass(variant, pass_name)
    path = export_onnx(variant, tmp_path / "rms.onnx", opset=23)
    assert "RMSNormalization" in {n.op_type for n in onnx.load(str(path)).graph.node}
    got = OrtModel(path, threads=1).run(graph.example_inputs)
    assert compare_outputs(graph.run(), got).max_rel_err <= 1e-4
