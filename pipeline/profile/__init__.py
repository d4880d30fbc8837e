"""Throughput profiling: `python -m pipeline profile SPEC` runs the training step that `train`
builds, with named regions timed, and reports images/s, a per-phase breakdown, FLOPs and MFU."""
