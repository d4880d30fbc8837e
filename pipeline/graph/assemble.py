"""A network from its spec: the analyzed plan instantiated with real weights, and build_network,
which analyzes, instantiates and compiles one."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.graph.check import analyze_network
from pipeline.graph.compile import compile_network, to_memory_format
from pipeline.graph.module import Chain, GraphModule
from pipeline.graph.plan import NetworkPlan, context


def instantiate(loaded, plan: NetworkPlan, device: str | torch.device = "cpu") -> GraphModule:
    """Build the analyzed network with real, initialized weights on `device`."""
    ctx = context(loaded.spec, plan.which, meta=torch.device(device).type == "meta")
    modules: dict[str, nn.Module] = {}
    with torch.device(device):
        growth = plan.growth
        for name, instances in plan.instances.items():
            built = [inst.build(dict(shapes), ctx.for_node(inst)) for inst, shapes in instances]
            if growth is not None and name in growth.per_stage:
                modules[name] = nn.ModuleList(built)  # one per stage
            elif len(built) > 1 or (growth is not None and name == growth.chain):
                modules[name] = Chain(built)
            else:
                modules[name] = built[0]
    return GraphModule(modules, plan)


def build_network(loaded, which: str, device: str | torch.device = "cpu", *, compile: bool = True) -> GraphModule:
    """Analyze, instantiate (in the memory format of `compile.channels_last`) and, when the spec's
    `compile.enabled` says so (and `compile` is not False, for a caller that copies the module
    first), torch.compile a network."""
    module = instantiate(loaded, analyze_network(loaded, which), device)
    to_memory_format(module, loaded.spec.compile)
    return compile_network(module, loaded.spec.compile) if compile else module
