"""One graph builder for every rewrite and every cost sketch.

``GraphBuilder(gm)`` appends ATen calls at ``gm.graph``'s current insertion
point (wrap it in ``gm.graph.inserting_before(node)``) and registers constant
tensors as new attributes of ``gm``, never writing into an existing one (the
original graph shares its weights with every variant).

``GraphBuilder()`` without a module builds a free-standing sketch whose nodes
carry meta-device values (shapes and dtypes, no memory): cost models use it to
price a candidate form of a sub-graph before any pass writes it.
"""

from __future__ import annotations

import torch
import torch.fx

from tfcompile.structure.core import add_constant
from tfcompile.structure.stream import METADATA_OPS, real_users


class GraphBuilder:
    def __init__(self, gm: torch.fx.GraphModule | None = None, *, dtype: torch.dtype = torch.float32):
        self.gm = gm
        self.graph = gm.graph if gm is not None else torch.fx.Graph()
        self.dtype = dtype  # of sketch values
        self._sketch_constants = 0

    def __call__(self, target, *args, shape=None, **kwargs) -> torch.fx.Node:
        """``target(*args, **kwargs)`` as a new node; ``shape`` gives a sketch node its value."""
        return self._shaped(self.graph.call_function(target, args, kwargs), shape)

    def const(self, name: str, value: torch.Tensor) -> torch.fx.Node:
        """A new attribute holding ``value`` (its name made unique from ``name``), read by a get_attr."""
        if self.gm is None:
            raise ValueError("a sketch has no module to hold constants: use sketch_const(shape)")
        return self.graph.get_attr(add_constant(self.gm, name, value))

    def input(self, name: str, shape) -> torch.fx.Node:
        """A sketch's placeholder of the given shape."""
        return self._shaped(self.graph.placeholder(name), shape)

    def sketch_const(self, shape) -> torch.fx.Node:
        """A sketch's weight of the given shape (no tensor behind it)."""
        self._sketch_constants += 1
        return self._shaped(self.graph.get_attr(f"c{self._sketch_constants}"), shape)

    def call_nodes(self) -> list[torch.fx.Node]:
        """The sketch's operations, in the form the cost models read a graph."""
        return [n for n in self.graph.nodes if n.op == "call_function"]

    def _shaped(self, node: torch.fx.Node, shape) -> torch.fx.Node:
        if shape is not None:
            node.meta["val"] = torch.empty(tuple(shape), dtype=self.dtype, device="meta")
        return node


def remove_dead_code(gm: torch.fx.GraphModule, replaced_attrs: set[str] = frozenset()) -> None:
    """Drop nodes nobody reads, then those of ``replaced_attrs`` no get_attr reads any more.

    A traced metadata assert keeps the value it checks alive; an assert whose
    value nothing else reads goes with it (e.g. the S×S causal-mask
    construction that a rewritten attention no longer reads). ``replaced_attrs``
    are for passes on a clone (``apply_pass``): the clone's modules are its own,
    so the original keeps its weights, and exports of the variant do not carry
    the replaced ones."""
    graph = gm.graph
    while True:
        graph.eliminate_dead_code()
        orphan_asserts = [n for n in graph.nodes if n.op == "call_function" and n.target in METADATA_OPS
                          and n.args and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "call_function"
                          and not real_users(n.args[0])]
        if not orphan_asserts:
            break
        for node in orphan_asserts:
            graph.erase_node(node)
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    for target in set(replaced_attrs) - used:
        *path, field = target.split(".")
        owner = gm
        for part in path:
            owner = getattr(owner, part, None)
        if owner is not None and hasattr(owner, field):
            delattr(owner, field)
