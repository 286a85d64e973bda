"""Lower precision: dynamically quantized int8 linears, and half-precision arithmetic.

- ``quantize_int8_dynamic`` rewrites every ``aten.linear`` whose weight is a
  model attribute into ``tfcompile::linear_int8`` (``structure.precision``):
  the weight stored as int8, symmetric per output column; the activation
  quantized per call to uint8. ONNX Runtime runs it as ``DynamicQuantizeMatMul``.
- ``half_precision(dtype=fp16|bf16)`` casts every floating weight and input to
  the half type, makes ops that create fp32 tensors (masks, position tables)
  create the half type, and casts the outputs back to fp32, so callers see the
  same signature.

Preconditions, read from the pass context: the target must do the dtype's
arithmetic faster than fp32 (its peak for the dtype; on a CPU that is the ISA:
VNNI/AMX for int8, AVX512_BF16/AMX for bf16, AVX512_FP16/AMX for fp16), and the
backend must run it with a kernel of its own (``RUNTIME_KERNELS``), since a
runtime that converts back to fp32 gains nothing. The int8 pass needs at least
one linear with a weight attribute.

Both are approximate: rounding the weights (int8: to 255 levels per column;
half: to 11 or 8 significant bits) and the activations changes the function.
The search measures the variant's quality against the fp32 original and keeps
it only within the user's budget. The torch graph computes what the runtime
computes (the int8 op reproduces ONNX Runtime's arithmetic bit for bit), so the
figure measured in torch is the deployed model's.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from tfcompile import structure
from tfcompile.graph import ModelGraph, fetch_attr
from tfcompile.passes.base import Exactness, PassRefused, PassResult, Stage, found_or_refuse, register_pass
from tfcompile.passes.context import PassContext
from tfcompile.structure.precision import LINEAR_INT8, quantize_weight

aten = torch.ops.aten

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# (device kind, backend) pairs whose lowering has a kernel for the dtype. Elsewhere the runtime would
# convert to fp32 and back (or, for the int8 op, not lower it at all), which only costs time.
RUNTIME_KERNELS = {
    "int8": {("cpu", "ort")},  # DynamicQuantizeMatMul (MLAS: VNNI/AMX-INT8 kernels where the CPU has them)
    "fp16": {("gpu", "ort"), ("gpu", "torch"), ("cpu", "torch")},  # ORT's CPU kernels have no x86 fp16 GEMM
    "bf16": {("gpu", "torch"), ("cpu", "torch")},  # ORT has no bf16 GEMM on CPU; its CUDA EP barely any
}


def check_runs_faster(context: PassContext, dtype: str) -> None:
    """Refuse unless the context's target and backend do ``dtype`` arithmetic faster than fp32."""
    device, backend = context.device, context.backend
    if (device.kind, backend) not in RUNTIME_KERNELS[dtype]:
        raise PassRefused(f"{backend} on a {device.kind} has no {dtype} kernels: the variant would run as fp32 "
                          "plus conversions")
    if device.peak_for(dtype) <= device.peak_for("fp32"):
        what = {"int8": "int8 dot-product instructions (VNNI, AMX-INT8)",
                "bf16": "bf16 instructions (AVX512_BF16, AMX-BF16)",
                "fp16": "fp16 instructions (AVX512_FP16, AMX-FP16)"}[dtype]
        where = f"this CPU has no {what}" if device.kind == "cpu" else f"{device.name} lists no faster {dtype} peak"
        raise PassRefused(f"{where}: {dtype} would be no faster than fp32")


def _plan_int8(graph: ModelGraph, context: PassContext) -> list[structure.GemmSite]:
    check_runs_faster(context, "int8")
    sites = found_or_refuse([s for s in structure.gemm_sites(graph) if s.weight(graph).dim() == 2],
                            "no linear layer with a weight attribute to quantize")
    narrow = {str(s.weight(graph).dtype).removeprefix("torch.") for s in sites} - {"float32"}
    if narrow:
        raise PassRefused(f"the linears' weights are already {', '.join(sorted(narrow))}; int8 quantizes fp32 ones")
    return sites


@dataclasses.dataclass(frozen=True)
class QuantizedLinears:
    linears: int
    weight_bytes_before: int
    weight_bytes_after: int


@register_pass("quantize_int8_dynamic", Exactness.APPROXIMATE,
               "int8 weights per column and per-call int8 activations for every linear (ONNX Runtime's dynamic "
               "quantization)", plan=_plan_int8, stage=Stage.PRECISION)
def quantize_int8_dynamic(graph: ModelGraph, sites: list[structure.GemmSite]) -> PassResult:
    gm = graph.gm
    quantized: dict[str, tuple[str, str, str]] = {}  # weight attribute -> its int8 attributes (shared weights once)
    before = after = 0
    for site in sites:
        if site.weight_target not in quantized:
            weight = site.weight(graph)
            q, zero_point, scale = quantize_weight(weight)
            base = site.weight_target
            quantized[site.weight_target] = (structure.add_constant(gm, base + "_int8", q),
                                             structure.add_constant(gm, base + "_zero_point", zero_point),
                                             structure.add_constant(gm, base + "_scale", scale))
            before += weight.numel() * weight.element_size()
            after += q.numel() + scale.numel() * 4
        bias = site.bias(graph)
        with gm.graph.inserting_before(site.node):
            names = quantized[site.weight_target]
            if bias is None:  # the op always adds a bias: a zero one keeps it to one form
                rows = site.weight(graph).shape[0]
                names += (structure.add_constant(gm, site.weight_target + "_zero_bias", torch.zeros(rows)),)
            else:
                names += (site.bias_target,)
            # The input as the node holds it now: an earlier replacement may have rewired it (chained linears).
            x = site.node.args[0] if site.kind == "linear" else site.node.args[1]
            args = [x] + [gm.graph.get_attr(name) for name in names]
            replacement = gm.graph.call_function(LINEAR_INT8, tuple(args))
        replacement.meta.update(site.node.meta)
        site.node.replace_all_uses_with(replacement)
        gm.graph.erase_node(site.node)
    gm.graph.eliminate_dead_code()
    return PassResult(graph, True, f"quantized {len(sites)} linears to int8 ({before / 1e6:.1f} -> "
                      f"{after / 1e6:.1f} MB of weights)", QuantizedLinears(len(sites), before, after))


@dataclasses.dataclass(frozen=True)
class HalfPlan:
    dtype: torch.dtype
    weights: list[torch.fx.Node]  # get_attr nodes holding fp32 tensors
    inputs: list[torch.fx.Node]  # fp32 placeholders


def _is_float_tensor(value) -> bool:
    meta = structure.tensor_meta(value) if isinstance(value, torch.fx.Node) else None
    return meta is not None and meta.is_floating_point()


def _explicit_dtype(node: torch.fx.Node) -> torch.dtype | None:
    """The dtype a cast or creation op is told to produce (None if the op follows its inputs)."""
    if node.target is aten.to.dtype and len(node.args) > 1:
        return node.args[1]
    return node.kwargs.get("dtype")


def _plan_half(graph: ModelGraph, context: PassContext, dtype: str = "fp16") -> HalfPlan:
    if dtype not in HALF_DTYPES:
        raise ValueError(f"half_precision dtype {dtype!r}: use fp16 or bf16")
    check_runs_faster(context, dtype)
    weights = [n for n in graph.nodes("get_attr") if fetch_attr(graph.gm, n.target).dtype == torch.float32
               and not all(_explicit_dtype(user) == torch.float32 for user in n.users)]
    found_or_refuse(weights, "no fp32 weights to convert")
    inputs = [n for n in graph.nodes("placeholder") if _is_float_tensor(n) and n.meta["val"].dtype == torch.float32]
    return HalfPlan(HALF_DTYPES[dtype], weights, inputs)


@register_pass("half_precision", Exactness.APPROXIMATE,
               "fp16 or bf16 weights and arithmetic, fp32 inputs and outputs", plan=_plan_half,
               stage=Stage.PRECISION)
def half_precision(graph: ModelGraph, plan: HalfPlan) -> PassResult:
    """Weights and inputs become half; an op that meets a half and an fp32 operand casts the fp32 one.

    Like autocast, values the model computes from integers or explicitly in fp32 (rotary tables
    from positions, masks) stay fp32 until they meet the half-precision stream, and a tensor the
    model only ever reads through an fp32 cast (RoPE's inverse frequencies) keeps its dtype, so a
    position's angle is not rounded to 11 bits before its sine is taken.
    """
    gm = graph.gm
    half: set[torch.fx.Node] = set()
    converted: dict[str, str] = {}
    for node in plan.weights:
        if node.target not in converted:
            value = fetch_attr(gm, node.target)
            converted[node.target] = structure.add_constant(gm, str(node.target) + "_half", value.to(plan.dtype))
        node.target = converted[node.target]
        half.add(node)
    for node in plan.inputs:
        with gm.graph.inserting_after(node):
            cast = gm.graph.call_function(aten._to_copy.default, (node,), {"dtype": plan.dtype})
        node.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
        half.add(cast)
    casts = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node in half:
            continue
        if node.target is aten._assert_tensor_metadata.default:  # asserts the dtype it was traced with
            gm.graph.erase_node(node)
            continue
        if not any(arg in half for arg in node.all_input_nodes):
            continue
        if _explicit_dtype(node) is not None:
            continue  # an explicit cast: to fp32 it is an upcast (norm statistics, softmax) and stays one

        def to_half(arg):
            nonlocal casts
            if arg in half or not _is_float_tensor(arg) or arg.meta["val"].dtype != torch.float32:
                return arg
            casts += 1
            with gm.graph.inserting_before(node):
                cast = gm.graph.call_function(aten._to_copy.default, (arg,), {"dtype": plan.dtype})
            half.add(cast)
            return cast

        node.args = torch.fx.node.map_arg(node.args, to_half)
        node.kwargs = torch.fx.node.map_arg(node.kwargs, to_half)
        if _is_float_tensor(node) or isinstance(node.meta.get("val"), (tuple, list)):
            half.add(node)
    output = next(iter(reversed(gm.graph.nodes)))

    def to_fp32(value):
        if value in half and _is_float_tensor(value):
            with gm.graph.inserting_before(output):
                return gm.graph.call_function(aten._to_copy.default, (value,), {"dtype": torch.float32})
        return value

    output.args = (torch.fx.node.map_arg(output.args[0], to_fp32),)
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[plan.dtype]
    return PassResult(graph, True, f"{len(converted)} weights and {len(plan.inputs)} inputs in {name}; {casts} "
                      "fp32 values cast where they meet them; outputs cast back to fp32")
