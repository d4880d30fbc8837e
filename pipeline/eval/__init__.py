"""Evaluation: sampling from a trained generator, and the metrics that score its samples.

`features` holds the pluggable feature networks (the standard Inception, the demo classifier),
`classifier` trains the demo classifier, `metrics` computes FID, KID, IS and the class accuracy
against reference statistics of the real data cached beside the shards.
"""
