"""How a built network runs: its feature maps' memory format, and torch.compile of the whole
network or of each node that holds weights."""

from __future__ import annotations

from collections import Counter

from torch import nn

from pipeline.graph.module import GraphModule

# Graphs of GraphModule.forward (shared by G and D) per stage and phase of a growing network: a
# step calls G without and with gradients, D on real, fake and interpolated images (measured: 5)
RECOMPILES_PER_PHASE = 8


def to_memory_format(module: GraphModule, settings) -> GraphModule:
    """Run the network's feature maps channels-last when `settings.channels_last`: its 4-D inputs
    and node outputs are made channels-last (a no-op for those that already are: convolutions
    given a channels-last input return one, and element-wise ops, norms, pooling and upsampling
    keep the format, so in practice the image inputs and reshapes convert). The weights keep their
    layout: DeepSpeed views them as bytes to broadcast them, which needs a contiguous last dimension,
    and ZeRO 1/2 flatten them anyway; the convolution follows the input's format."""
    module.channels_last = settings.channels_last
    return module


def compile_network(module: GraphModule, settings) -> GraphModule:
    """torch.compile in place when `settings.enabled` (state-dict keys unchanged).

    `scope: regional` compiles each node that holds weights (each instance of a repeated node, each
    stage's converter) on its own; blocks of one class with the same settings and shapes share one
    compiled graph (the shapes are static, so each resolution of a repeated block compiles once per
    way a step calls it). `scope: whole` compiles `GraphModule.forward`: G and D share its code
    object, and without `dynamic=False` the second network would look like a shape change and
    recompile dynamically.

    A growing network compiles once per stage and fade-in (its stage and fading are Python
    attributes the graph is specialised on; alpha is a tensor, so a phase never recompiles), and
    each of those a few times over for the ways a step calls it (with or without gradients, on
    inputs that need them or not). dynamo's limit of recompilations per function (8 by default)
    is raised to cover what a network can ask of one function."""
    if not settings.enabled:
        return module
    import torch._dynamo

    regions = [module] if settings.scope == "whole" else _regions(module)
    phases = 2 * module.growth.num_stages - 1 if module.growth is not None else 1
    # the most compiled graphs one forward's code object may hold: one per way a step calls it, per
    # phase, per instance sharing the code (regional: the instances of one class)
    sharing = max(Counter(type(r).forward for r in regions).values(), default=1)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILES_PER_PHASE * phases * sharing)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, config.recompile_limit)
    mode = {"mode": settings.mode} if settings.backend == "inductor" else {}
    for region in regions:
        region.compile(backend=settings.backend, fullgraph=settings.fullgraph, dynamic=False, **mode)
    return module


def _regions(module: GraphModule) -> list[nn.Module]:
    """The modules regional compilation compiles: every node module holding weights, and each
    instance of a repeated node or per-stage converter. Parameter-free nodes (wiring, activations)
    run eagerly: a compiled call of one element-wise op costs more than the op."""
    found = []
    for node in module.values():
        for m in node if isinstance(node, nn.ModuleList) else (node,):  # Chain is a ModuleList too
            if next(m.parameters(), None) is not None:
                found.append(m)
    return found
