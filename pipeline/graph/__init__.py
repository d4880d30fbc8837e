from pipeline.graph.build import (  # noqa: F401
    GraphModule,
    NetworkPlan,
    analyze_network,
    analyze_spec,
    build_network,
    compile_network,
    instantiate,
    to_memory_format,
)
