"""Distributed training: everything that touches torch.distributed or DeepSpeed.

`sync_bn` holds the cross-replica BatchNorm statistics that `pipeline.blocks.layers.BatchNorm`
uses when a process group with more than one rank is initialised; it imports torch only, never
DeepSpeed, so model code may depend on it. This package file imports nothing, so importing
`pipeline.distributed.sync_bn` does not load DeepSpeed either.
"""
