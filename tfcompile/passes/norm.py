"""Norm fusion: exact Pre-LN → Pre-RMSNorm → Pre-CRMSNorm, affine folding, norm fusion.

Following Jiang et al. (NeurIPS'23, "Pre-RMSNorm and Pre-CRMSNorm
Transformers"); see techniques.md §1. With C = I − 11ᵀ/d:

- ``fuse_norm`` replaces a norm written out as arithmetic (Llama's
  to/pow/mean/add/rsqrt/mul/mul(w); a hand-written LayerNorm
  mean/sub/pow/mean/add/rsqrt/mul[/mul/add]) by one ``aten.rms_norm`` /
  ``aten.layer_norm`` with the same ε. Exact: the same formula, one kernel.
  Only fp32-clean subgraphs match (every ``to`` in them must be a no-op cast).
- ``fold_norm_affine`` moves each norm's γ/β into the linear layers that read
  it (through views that keep the last axis): W ← W·diag(γ), b ← b + Wβ
  (GPT-2's Conv1D addmm stores Wᵀ, so rows are scaled there). Exact by
  linearity: (n⊙γ + β)Wᵀ + b = n(W·diag γ)ᵀ + (b + Wβ). Tied weights get a new
  attribute per reader, which unties e.g. GPT-2's lm_head from wte. All or
  nothing: refused when some norm with γ/β has a reader that is not a linear.
- ``layernorm_to_rmsnorm`` centres every writer of the residual stream
  (E ← E·C on the model axis) and replaces each LayerNorm by RMSNorm with the
  same ε. Exact because every stream value becomes x − mean(x), LN(x − c1) =
  LN(x), and a zero-mean x has variance = mean square. Preconditions (checked
  on the graph by ``structure.residual_stream``): the stream is read only by
  norms and the next add (no Post-LN, no sandwich/Peri norms, no raw taps),
  and every writer is a weight or constant table. γ is kept as RMSNorm's
  scale and β as an ``add`` right after it; run ``fold_norm_affine`` first to
  drop both.
- ``rmsnorm_to_crmsnorm`` compresses the zero-mean stream to its first d−1
  coordinates (the last is minus their sum). Preconditions: the stream's
  writers are centred (checked on the weights, so a native RMSNorm model such
  as Llama is refused), every norm is an RMSNorm without γ/β, and every norm
  reader is a linear. Exact: with x_d = −Σx_i, ‖x‖² = ‖x'‖² + (1ᵀx')² and
  Wx = (W[:, :d−1] − W[:, d−1]1ᵀ)x'.
"""

from __future__ import annotations

import torch
import torch.fx

from tfcompile.graph import ModelGraph, fetch_attr
from tfcompile import structure
from tfcompile.passes.base import Exactness, PassRefused, PassResult, Stage, found_or_refuse, register_pass
from tfcompile.passes.context import PassContext

aten = torch.ops.aten

# A writer counts as centred when the mean over the model axis is this small
# relative to its largest entry; fp32 rounding of a centred table is ~1e-7,
# an uncentred random table is ~1e-2.
CENTRED_RTOL = 1e-5


def _new_attr(graph: ModelGraph, before: torch.fx.Node, base: str, value: torch.Tensor) -> torch.fx.Node:
    """A get_attr for a NEW buffer: weights are shared with other variants and never written."""
    name = structure.add_constant(graph.gm, base, value.contiguous())
    with graph.gm.graph.inserting_before(before):
        node = graph.gm.graph.get_attr(name)
    node.meta["val"] = value
    return node


def _copy_meta(dst: torch.fx.Node, src: torch.fx.Node) -> None:
    for key in ("nn_module_stack", "stack_trace"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def _problem(problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


# --------------------------------------------------------------------------- fuse_norm

def _plan_fuse(graph: ModelGraph, context: PassContext) -> list[structure.DecomposedNorm]:
    return found_or_refuse(structure.decomposed_norms(graph),
                           "no RMSNorm/LayerNorm written out as arithmetic (mean/pow/rsqrt) over the last axis")


@register_pass("fuse_norm", Exactness.EXACT,
               "replace norms written out as arithmetic by one aten.rms_norm / aten.layer_norm",
               plan=_plan_fuse, stage=Stage.NORMS)
def fuse_norm(graph: ModelGraph, found: list[structure.DecomposedNorm]) -> PassResult:
    g = graph.gm.graph
    for m in found:
        with g.inserting_before(m.output):
            if m.kind == "rms_norm":
                fused = g.call_function(aten.rms_norm.default, (m.input, [m.dim], m.weight, m.eps))
            else:
                fused = g.call_function(aten.layer_norm.default, (m.input, [m.dim], m.weight, m.bias, m.eps))
        _copy_meta(fused, m.output)
        m.output.replace_all_uses_with(fused)
        inner = set(m.nodes)
        # The traced dtype asserts read interior values; they go with them.
        for node in m.nodes:
            for user in list(node.users):
                if user not in inner and not structure.real_users(user):
                    g.erase_node(user)
        for node in reversed(m.nodes):
            if not node.users:
                g.erase_node(node)
        for user in list(m.input.users):
            if structure.is_passthrough(user) and not structure.real_users(user):
                for check in list(user.users):
                    g.erase_node(check)
                g.erase_node(user)
    kinds = [m.kind for m in found]
    return PassResult(graph, bool(found), f"fused {kinds.count('rms_norm')} RMSNorms and "
                                          f"{kinds.count('layer_norm')} LayerNorms")


# --------------------------------------------------------------------------- fold_norm_affine

def _plan_fold(graph: ModelGraph, context: PassContext) -> list[tuple[structure.NormSite, list]]:
    """[(site, readers)] for every norm with γ/β; refused with the reason one cannot be folded."""
    plan, problems = [], []
    for site in structure.norm_sites(graph):
        if not site.has_affine:
            continue
        if any(p is not None and p.op != "get_attr" for p in (site.weight, site.bias)):
            problems.append(f"{site.node.name}: γ/β are computed, not model weights")
            continue
        readers, problem = structure.norm_readers(site)
        if problem is None and not readers:
            problem = f"{site.node.name} has no reader"
        if problem is not None:
            problems.append(problem)
            continue
        plan.append((site, readers))
    if not plan and not problems:
        raise PassRefused("no norm has an affine γ/β left to fold")
    if problems:
        raise PassRefused(_problem(problems))
    return plan


@register_pass("fold_norm_affine", Exactness.EXACT,
               "fold each norm's γ/β into the linear layers that read it (W·diag γ, b + Wβ)",
               plan=_plan_fold, stage=Stage.NORMS, runs_after=("fuse_norm", "merge_qkv_projections"))
def fold_norm_affine(graph: ModelGraph, plan: list[tuple[structure.NormSite, list]]) -> PassResult:
    folded = 0
    for site, readers in plan:
        gamma = fetch_attr(graph.gm, site.weight.target).double() if site.weight is not None else None
        beta = fetch_attr(graph.gm, site.bias.target).double() if site.bias is not None else None
        for reader in readers:
            w = fetch_attr(graph.gm, reader.weight.target)
            b = fetch_attr(graph.gm, reader.bias.target) if reader.bias is not None else None
            w64 = w.double()
            b64 = b.double() if b is not None else None
            # linear: y = x Wᵀ + b (W is out×in); addmm: y = b + x W (W is in×out).
            w_in_last = reader.kind == "linear"
            if gamma is None:
                new_w = w64
            else:
                new_w = w64 * gamma[None, :] if w_in_last else gamma[:, None] * w64
            new_b = b64
            if beta is not None:
                shift = w64 @ beta if w_in_last else beta @ w64
                new_b = shift if new_b is None else new_b + shift
            node = reader.node
            w_node = _new_attr(graph, node, f"{reader.weight.target}_folded", new_w.to(w.dtype))
            node.replace_input_with(reader.weight, w_node)
            if new_b is not None and new_b is not b64:
                b_node = _new_attr(graph, node, f"{node.name}_bias_folded", new_b.to(w.dtype))
                if reader.bias is not None:
                    node.replace_input_with(reader.bias, b_node)
                else:
                    node.args = (node.args[0], node.args[1], b_node)
        if site.kind == "layer_norm":
            site.node.args, site.node.kwargs = (site.input, [site.dim], None, None, site.eps), {}
        else:
            site.node.args, site.node.kwargs = (site.input, [site.dim], None, site.eps), {}
            if site.bias_node is not None:
                site.bias_node.replace_all_uses_with(site.node)
                graph.gm.graph.erase_node(site.bias_node)
        folded += 1
    readers = sum(len(r) for _, r in plan)
    return PassResult(graph, folded > 0, f"folded γ/β of {folded} norms into {readers} linear layers")


# --------------------------------------------------------------------------- layernorm_to_rmsnorm

def _writer_tensors(writer: structure.StreamWriter) -> list[tuple[torch.fx.Node, int]]:
    """(get_attr, axis) pairs whose model axis must be centred / sliced for ``writer``."""
    if writer.kind == "constant":
        return [(writer.weight, writer.axis)]
    if writer.kind == "embedding":
        return [(writer.weight, 1)]
    axis = {"linear": 0, "addmm": 1, "conv": 0}[writer.kind]
    pairs = [(writer.weight, axis)]
    if writer.bias is not None:
        pairs.append((writer.bias, -1 if writer.kind == "addmm" else 0))
    return pairs


def _rewrite_writers(graph: ModelGraph, stream: structure.ResidualStream, transform, tag: str) -> int:
    """Give every writer new weights ``transform(tensor, axis)`` (one new buffer per old one)."""
    cache: dict[tuple[str, int], str] = {}
    count = 0
    for writer in stream.writers:
        user = writer.consumer if writer.kind == "constant" else writer.node
        for old, axis in _writer_tensors(writer):
            key = (old.target, axis)
            if key not in cache:
                value = transform(fetch_attr(graph.gm, old.target), axis)
                cache[key] = structure.add_constant(graph.gm, f"{old.target}_{tag}", value.contiguous())
            with graph.gm.graph.inserting_before(user):
                new = graph.gm.graph.get_attr(cache[key])
            user.replace_input_with(old, new)
        count += 1
    return count


def _centre(t: torch.Tensor, axis: int) -> torch.Tensor:
    t64 = t.double()
    return (t64 - t64.mean(axis, keepdim=True)).to(t.dtype)


def _writers_centred(graph: ModelGraph, stream: structure.ResidualStream) -> str | None:
    for writer in stream.writers:
        for node, axis in _writer_tensors(writer):
            t = fetch_attr(graph.gm, node.target).double()
            scale = t.abs().max().item()
            if scale > 0 and t.mean(axis).abs().max().item() > CENTRED_RTOL * scale:
                return f"writer {writer.node.name} ({writer.kind}) is not centred"
    return None


def _native_rms_hint(graph: ModelGraph) -> str | None:
    rms = [s for s in structure.norm_sites(graph) if s.kind == "rms_norm"]
    if rms:
        return f"the model already uses RMSNorm ({len(rms)} aten.rms_norm nodes); there is no LayerNorm to convert"
    kinds = [m.kind for m in structure.decomposed_norms(graph)]
    if kinds.count("rms_norm"):
        return (f"the model already uses RMSNorm ({kinds.count('rms_norm')} RMSNorms written out as "
                "pow/mean/rsqrt, as in Llama); there is no LayerNorm to convert")
    if kinds.count("layer_norm"):
        return f"{kinds.count('layer_norm')} LayerNorms are written out as arithmetic: run fuse_norm first"
    return None


def _plan_ln2rms(graph: ModelGraph, context: PassContext) -> structure.ResidualStream:
    sites = structure.norm_sites(graph)
    if not any(s.kind == "layer_norm" for s in sites):
        raise PassRefused(_native_rms_hint(graph) or "no LayerNorm in the graph")
    stream = structure.residual_stream(graph)
    if stream.problems:
        raise PassRefused("not a Pre-LN stream: " + _problem(stream.problems))
    if any(s.kind == "rms_norm" for s in stream.norms):
        reason = _writers_centred(graph, stream)
        if reason is not None:
            raise PassRefused(f"the stream is also read by an RMSNorm, whose output centring would change ({reason})")
    return stream


def swap_layernorms(graph: ModelGraph) -> int:
    """LayerNorm → RMSNorm(γ) [+ β] with the same ε. Exact only on a zero-mean stream:
    alone (without centring) it is the negative control of the tests."""
    g = graph.gm.graph
    count = 0
    for site in structure.norm_sites(graph):
        if site.kind != "layer_norm":
            continue
        node = site.node
        with g.inserting_before(node):
            out = g.call_function(aten.rms_norm.default, (site.input, [site.dim], site.weight, site.eps))
            _copy_meta(out, node)
            if site.bias is not None:
                out = g.call_function(aten.add.Tensor, (out, site.bias))
                _copy_meta(out, node)
        node.replace_all_uses_with(out)
        g.erase_node(node)
        count += 1
    return count


@register_pass("layernorm_to_rmsnorm", Exactness.EXACT,
               "centre the residual stream's writers and replace Pre-LN LayerNorms by RMSNorm",
               plan=_plan_ln2rms, stage=Stage.NORMS, runs_after=("fold_norm_affine",))
def layernorm_to_rmsnorm(graph: ModelGraph, stream: structure.ResidualStream) -> PassResult:
    centred = _rewrite_writers(graph, stream, _centre, "centred")
    swapped = swap_layernorms(graph)
    graph.gm.graph.eliminate_dead_code()
    return PassResult(graph, swapped > 0, f"centred {centred} stream writers, replaced {swapped} LayerNorms "
                                          f"by RMSNorm")


# --------------------------------------------------------------------------- rmsnorm_to_crmsnorm

def _plan_crms(graph: ModelGraph, context: PassContext):
    """(stream, readers per norm), or refused with the first precondition that fails."""
    sites = structure.norm_sites(graph)
    if any(s.kind == "layer_norm" for s in sites):
        raise PassRefused("LayerNorms remain: run layernorm_to_rmsnorm first (CRMS needs a zero-mean stream)")
    if not sites:
        raise PassRefused("no RMSNorm in the graph")
    stream = structure.residual_stream(graph)
    if stream.problems:
        raise PassRefused("not a Pre-norm stream: " + _problem(stream.problems))
    for site in sites:
        if site.has_affine:
            raise PassRefused(f"{site.node.name} still has γ/β: run fold_norm_affine first (the compressed norm "
                              "cannot apply a per-coordinate scale to the dropped coordinate)")
    reason = _writers_centred(graph, stream)
    if reason is not None:
        raise PassRefused(f"the residual stream is not zero-mean ({reason}); run layernorm_to_rmsnorm first "
                          "(a native RMSNorm model such as Llama cannot be compressed)")
    if stream.d is None or stream.d < 2:
        raise PassRefused("norms of different widths")
    readers = {}
    for site in sites:
        found, problem = structure.norm_readers(site)
        if problem is not None:
            raise PassRefused(f"every norm reader must be a linear layer: {problem}")
        readers[site] = found
    return stream, readers


def _resize(node: torch.fx.Node, axis: int, d: int) -> None:
    if node.op == "call_function" and node.target in structure.SIZED_OPS:
        sizes = list(node.args[1])
        if sizes[axis] == d:
            sizes[axis] = d - 1
            node.update_arg(1, sizes)


def _crms_norm(graph: ModelGraph, site: structure.NormSite, d: int) -> torch.fx.Node:
    """y = x / sqrt((‖x‖² + (1ᵀx)²)/d + ε) on the compressed x (d−1 coordinates)."""
    g, x = graph.gm.graph, site.input
    eps = site.eps if site.eps is not None else torch.finfo(structure.tensor_meta(site.node).dtype).eps
    call = g.call_function
    with g.inserting_before(site.node):
        sq_sum = call(aten.sum.dim_IntList, (call(aten.mul.Tensor, (x, x)), [-1], True))
        total = call(aten.sum.dim_IntList, (x, [-1], True))
        mean_sq = call(aten.div.Tensor, (call(aten.add.Tensor, (sq_sum, call(aten.mul.Tensor, (total, total)))), d))
        out = call(aten.mul.Tensor, (x, call(aten.rsqrt.default, (call(aten.add.Tensor, (mean_sq, eps)),))))
    for node in (sq_sum, total, mean_sq, out):
        _copy_meta(node, site.node)
    return out


@register_pass("rmsnorm_to_crmsnorm", Exactness.EXACT,
               "compress a zero-mean RMSNorm stream to d−1 coordinates (CRMSNorm)",
               plan=_plan_crms, stage=Stage.NORMS, runs_after=("layernorm_to_rmsnorm",))
def rmsnorm_to_crmsnorm(graph: ModelGraph, plan) -> PassResult:
    """Keep the first d−1 coordinates of the stream; its last is minus their sum.

    Writers keep rows [:d−1]; readers become W[:, :d−1] − W[:, d−1]1ᵀ; each
    RMSNorm becomes x / sqrt((‖x‖² + (1ᵀx)²)/d + ε); views and expands with a
    hard-coded d on the model axis get d−1.

    GEMM alignment: d−1 is odd for every even d, so it is no longer a multiple
    of 8 (fp16 tensor cores, AVX-512 fp32 lanes are 16) or of the 64/128 tile
    widths that GEMM kernels block by. The writers' output dimension and the
    readers' reduction dimension then need padded or remainder tiles, which can
    cost more than the saved mean pass (e.g. d=768 → 767). The compressed norm
    also has no single ONNX/ATen op (it lowers to mul/sum/add/rsqrt), so this
    is mainly worth it where the backend fuses elementwise chains.
    """
    stream, readers = plan
    d = stream.d
    _rewrite_writers(graph, stream, lambda t, axis: t.narrow(axis, 0, d - 1), "crms")
    for node, axis in stream.dims.items():
        _resize(node, axis, d)
    count = 0
    for site, found in readers.items():
        for reader in found:
            for node in reader.path:
                _resize(node, len(structure.tensor_meta(node).shape) - 1, d)
            w = fetch_attr(graph.gm, reader.weight.target)
            w64 = w.double()
            if reader.kind == "linear":  # W is out×d: fold the last input column into the others
                new_w = w64[:, :d - 1] - w64[:, d - 1:]
            else:  # addmm: W is d×out
                new_w = w64[:d - 1] - w64[d - 1:]
            w_node = _new_attr(graph, reader.node, f"{reader.weight.target}_crms", new_w.to(w.dtype))
            reader.node.replace_input_with(reader.weight, w_node)
        out = _crms_norm(graph, site, d)
        site.node.replace_all_uses_with(out)
        graph.gm.graph.erase_node(site.node)
        count += 1
    graph.gm.graph.eliminate_dead_code()
    return PassResult(graph, count > 0, f"compressed the stream from {d} to {d - 1} and replaced {count} "
                                        f"RMSNorms by CRMSNorm")
