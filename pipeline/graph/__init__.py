from pipeline.graph.build import (GraphModule, NetworkPlan, analyze_network, analyze_spec,  # noqa: F401
                                  build_network, compile_network, instantiate)
