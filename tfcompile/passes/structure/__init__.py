"""Structure recognition shared by every pass.

Passes ask this module, not the raw graph, which nodes are linear layers and
their weights, which values depend on the model inputs, and which block a node
came from, so every pass sees the model the same way.
"""


from tfcompile.passes.structure.core import *  # noqa: F401,F403
from tfcompile.passes.structure.stream import *  # noqa: F401,F403
from tfcompile.passes.structure.decomposed import *  # noqa: F401,F403
from tfcompile.passes.structure.sequence import *  # noqa: F401,F403
from tfcompile.passes.structure.linear import *  # noqa: F401,F403
from tfcompile.passes.structure.evaluate import *  # noqa: F401,F403
from tfcompile.passes.structure.stream import _dim_arg  # noqa: F401  (used by padding's rewriter)
