"""The graph compiler: a network spec -> checked DAG -> shapes, params and FLOPs on `meta`
-> an `nn.ModuleDict` keyed by the node names of the YAML, with a forward that runs the DAG."""

from pipeline.graph.assemble import build_network, instantiate
from pipeline.graph.check import analyze_network, analyze_spec, output_warnings
from pipeline.graph.compile import compile_network, to_memory_format
from pipeline.graph.growth import Growth, Stage
from pipeline.graph.module import GraphModule
from pipeline.graph.plan import NetworkPlan

__all__ = [
    "GraphModule",
    "Growth",
    "NetworkPlan",
    "Stage",
    "analyze_network",
    "analyze_spec",
    "build_network",
    "compile_network",
    "instantiate",
    "output_warnings",
    "to_memory_format",
]
