"""Small read-only views of an ONNX graph: producers, consumers, reachability."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import onnx

# Ops whose outputs carry only shape information, not the values of their inputs.
SHAPE_OPS = frozenset({"Shape", "Size"})


class GraphIndex:
    """Who produces and who consumes each tensor of `model.graph`."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes = list(model.graph.node)
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            for name in n.input:
                self.consumers[name].append(n)
        self.initializers = {t.name for t in model.graph.initializer}

    def descendants(self, tensors: Iterable[str], through_shape: bool = True) -> set[str]:
        """Names of nodes reachable from `tensors`; optionally not through Shape/Size."""
        seen: set[str] = set()
        stack = list(tensors)
        while stack:
            for node in self.consumers.get(stack.pop(), []):
                if node.name in seen or (not through_shape and node.op_type in SHAPE_OPS):
                    continue
                seen.add(node.name)
                stack.extend(node.output)
        return seen

    def node_descendants(self, node: onnx.NodeProto) -> set[str]:
        return self.descendants(node.output) | {node.name}
