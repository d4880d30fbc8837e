"""The built network: GraphModule, a ModuleDict of the nodes whose forward runs the DAG, and
Chain, the modules of a repeated node."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.graph.growth import GrowingModule
from pipeline.graph.plan import NetworkPlan, gather, lookup


class Chain(nn.ModuleList):
    """A repeated node: each instance takes the previous output; other inputs are shared."""

    def forward(self, x, *shared):
        for block in self:
            x = block(x, *shared)
        return x


class GraphModule(GrowingModule, nn.ModuleDict):
    """The compiled network: a ModuleDict keyed by node name, run in topological order.

    A growing network (`grow:`) runs at its current stage (`set_stage`; the last one when built):
    the chain's instances of the stages so far, the per-stage nodes of that stage, and during a
    fade-in also the previous stage's path, blended with the new one by the buffer `alpha` (a
    tensor, so that a compiled graph does not recompile as alpha rises)."""

    def __init__(self, modules: dict[str, nn.Module], plan: NetworkPlan):
        super().__init__(modules)
        self.input_names = tuple(plan.inputs)
        self.steps = plan.steps
        self.output_refs = tuple(plan.outputs)
        self.growth = plan.growth
        if self.growth is not None:
            self.stage, self.fading = self.growth.num_stages - 1, False
            self.register_buffer("alpha", torch.ones(()), persistent=False)
        self.channels_last = False  # see to_memory_format

    def _layout(self, value):
        """A feature map in channels-last format when the network runs so (a no-op for one that is)."""
        if self.channels_last and isinstance(value, torch.Tensor) and value.dim() == 4:
            return value.contiguous(memory_format=torch.channels_last)
        return value

    def forward(self, *args):
        values = {name: self._layout(arg) for name, arg in zip(self.input_names, args, strict=True)}
        if self.growth is not None:
            return self._grown(values)
        for name, fields in self.steps:
            values[name] = self._layout(self[name](*(gather(values, mode, refs) for mode, refs in fields)))
        outs = tuple(lookup(values, ref) for ref in self.output_refs)
        return outs[0] if len(outs) == 1 else outs
