"""GraphBuilder: nodes with contract names, small inline constants, and weights from the engine spec.

Every exporter graph is built through one: `op` names each node by the contract (contract.node_name), `const`
deduplicates the small constants a graph needs (shapes, axes, scalars) as inline initializers, and `weight`
registers a tensor under the name the engine spec gives its role (engine_spec.WeightRef), after checking its
shape, in the shared weights.bin (weights.WeightsWriter), the initializer being an external-data reference.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from caprese.export import contract as C
from caprese.export.engine_spec import WeightRef
from caprese.export.weights import ONNX_DTYPES, WeightsWriter


def linear_t(w: torch.Tensor) -> torch.Tensor:
    """nn.Linear weight [out, in] -> math layout [in, out] (engine_spec.MATRIX)."""
    return w.detach().t()


def value_info(spec: C.TensorSpec) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(spec.name, ONNX_DTYPES[spec.dtype], list(spec.shape))


class GraphBuilder:
    """Nodes with contract names, inline constants, and external initializers from the shared WeightsWriter."""

    def __init__(self, weights: WeightsWriter, float_dtype: str):
        self.weights = weights
        self.fdt = float_dtype
        self.ft = ONNX_DTYPES[float_dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.node_names: set[str] = set()
        self.initializers: dict[str, onnx.TensorProto] = {}
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, inputs: list[str], scope: str, name: str, layer: int | None = None,
           out: str | list[str] | None = None, n_out: int = 1, **attrs) -> str | list[str]:
        node = C.node_name(scope, name, layer)
        if node in self.node_names:
            raise ValueError(f"duplicate node name {node}")
        self.node_names.add(node)
        if out is None:
            outs = [f"{node}/output_{j}" for j in range(n_out)]
        else:
            outs = [out] if isinstance(out, str) else list(out)
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node, **attrs))
        return outs[0] if len(outs) == 1 else outs

    @contextlib.contextmanager
    def subgraph(self):
        """Nodes added inside the block go to the list it yields (an If branch), not to the graph; names stay
        unique across both, constants and weights stay initializers of the graph (outer-scope references)."""
        outer, self.nodes = self.nodes, []
        try:
            yield self.nodes
        finally:
            self.nodes = outer

    def const(self, value, dtype: str) -> str:
        """A small inline initializer (shapes, axes, scalars), deduplicated by value."""
        arr = np.asarray(value, dtype={"float32": np.float32, "int64": np.int64, "float16": np.float16,
                                       "bool": np.bool_}.get(dtype, np.float32))
        key = (dtype, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"const.{dtype}.{len(self._consts)}"
            if dtype == "bfloat16":
                t = helper.make_tensor(name, TensorProto.BFLOAT16, arr.shape,
                                       torch.tensor(arr, dtype=torch.float32).to(torch.bfloat16).view(torch.int16)
                                       .numpy().astype(np.uint16).tobytes(), raw=True)
            else:
                t = helper.make_tensor(name, ONNX_DTYPES[dtype], arr.shape, arr.tobytes(), raw=True)
            self.initializers[name] = t
            self._consts[key] = name
        return self._consts[key]

    def fconst(self, value) -> str:
        return self.const(value, self.fdt)

    def weight(self, ref: WeightRef, t: torch.Tensor) -> str:
        """`t` stored once in weights.bin as the engine spec's `ref` (name, dtype); its shape must be ref's."""
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{ref.name}: the model gives a tensor of shape {list(t.shape)}, the engine spec "
                             f"{list(ref.shape)}")
        self.weights.add(ref.name, t, ref.dtype)
        if ref.name not in self.initializers:
            self.initializers[ref.name] = self.weights.initializer(ref.name)
        return ref.name

    def qweight(self, ref: WeightRef, qt) -> tuple[str, str]:
        """A quantized weight (engine_spec.WeightRef with quant; qt: caprese.model.quantization.QuantizedTensor)
        stored once in weights.bin, its codes in the spec's packing and its scales: (codes name, scale name)."""
        from caprese.export.quantized_weights import code_bytes, scale_tensor

        scale = ref.quant.scale
        if ref.name not in self.weights.table:
            self.weights.add_bytes(ref.name, code_bytes(ref, qt), list(ref.shape), ref.dtype)
        self.weights.add(scale.name, scale_tensor(ref, qt), scale.dtype)
        for name in (ref.name, scale.name):
            if name not in self.initializers:
                self.initializers[name] = self.weights.initializer(name)
        return ref.name, scale.name

    def nbits_weight(self, ref: WeightRef, qt) -> tuple[str, str]:
        """A MatMulNBits weight: (B initializer, scales): uint8 [N, K / block, block bytes] and [N * K / block],
        views of the bytes `qweight` stores (engine_spec.PACKING_NBITS)."""
        codes, scale = self.qweight(ref, qt)
        n, k = ref.shape
        bs = ref.quant.block_size
        b_name, s_name = codes + ".B", scale + ".flat"
        if b_name not in self.initializers:
            self.initializers[b_name] = self.weights.initializer(codes, ("uint8", [n, k // bs, bs * ref.quant.bits // 8],
                                                                         b_name))
            self.initializers[s_name] = self.weights.initializer(scale, (ref.quant.scale.dtype, [n * (k // bs)],
                                                                         s_name))
        return b_name, s_name

    def to_float32(self, x: str, scope: str, name: str, layer: int | None = None) -> str:
        """x as float32: itself at fp32, else a Cast node."""
        if self.fdt == "float32":
            return x
        return self.op("Cast", [x], scope, name, layer, to=TensorProto.FLOAT)
