"""Generation with a KV cache: prefill and decode-step graphs, greedy decoding, TTFT/TPOT measured and predicted.

- ``trace``: the two torch.export graphs of a Hugging Face causal LM, static cache as explicit tensors.
- ``greedy``: the greedy loop over any prefill/decode runners (torch, ONNX Runtime), and HF's reference.
- ``measure``: TTFT and TPOT on ONNX Runtime CPU with the cache bound to pre-allocated buffers.
- ``cost``: TTFT and TPOT predicted by the run's cost model; the decode step's weight-streaming bound.
- ``prepack``: a batch of prompts of different lengths packed into few rows and prefilled once, the cache
  split back into the decode step's layout.
- ``optimize``: variants of both graphs searched and ranked by generation time, checked token for token.
- ``pipeline``: ``optimize --generate`` as one library call, writing prefill.onnx, decode.onnx, report.json.
"""
