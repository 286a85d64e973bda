"""The public kit for reading and rewriting a traced graph.

Passes and cost models ask this package, not the raw graph, which nodes are
linear layers and their weights, where the residual stream and attention
blocks are, which values depend on the model inputs, and which block a node
came from, so every pass sees the model the same way. Everything a pass may
use is imported here by name; the submodules' other names are private.
"""

from tfcompile.structure.core import (  # noqa: F401
    LinearSite,
    NONDETERMINISTIC_OPS,
    SHAPE_ONLY_OPS,
    add_constant,
    input_dependent_nodes,
    linear_sites,
    module_path,
    tensor_meta,
    unique_attr_name,
)
from tfcompile.structure.shapes import (  # noqa: F401
    dim_arg,
    is_scalar,
    prod,
    shape_of,
)
from tfcompile.structure.stream import (  # noqa: F401
    METADATA_OPS,
    NORM_OPS,
    NormReader,
    NormSite,
    RESHAPE_OPS,
    ResidualStream,
    SIZED_OPS,
    StreamWriter,
    WRITER_KINDS,
    axis_forward,
    axis_through,
    is_passthrough,
    norm_readers,
    norm_sites,
    real_users,
    residual_stream,
)
from tfcompile.structure.decomposed import (  # noqa: F401
    DecomposedNorm,
    decomposed_norms,
)
from tfcompile.structure.sequence import (  # noqa: F401
    AttentionSite,
    SequenceInputs,
    attention_sites,
    sequence_inputs,
    valid_mask,
)
from tfcompile.structure.linear import (  # noqa: F401
    CHAIN_GEMM_OPS,
    FFNBlock,
    GemmSite,
    LinearChain,
    ffn_blocks,
    gemm_site,
    gemm_sites,
    linear_chains,
)
from tfcompile.structure.evaluate import (  # noqa: F401
    evaluate_nodes,
)
from tfcompile.structure.build import (  # noqa: F401
    GraphBuilder,
    remove_dead_code,
)
from tfcompile.structure.forms import (  # noqa: F401
    emit_blockdense_linear,
    emit_dense_linear,
    emit_lowrank_linear,
    sketch_of,
)
