"""Distributed training: the process group and DeepSpeed, behind one seam (`engines.Engine`).

Model code never imports this package: cross-replica BatchNorm (`pipeline.blocks.sync_bn`) is a
norm layer whose one collective is torch.distributed's functional all-reduce. This package file
imports nothing, so importing it does not load DeepSpeed.
"""
