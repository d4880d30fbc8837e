"""A declarative, graph-compiled pipeline for training large image GANs."""

import os

# MKL (torch's CPU BLAS) may sum in another order when the same data lies at other addresses:
# the same CPU run differed from one process to the next (progan_demo's weights after two steps,
# in the 7th digit, in about half of the runs). Its strict conditional-numerical-reproducibility
# mode on the AVX2 branch made 14 runs of 14 equal, at the same speed on this AVX-512 machine
# ("AUTO,STRICT" did not). MKL reads it when torch first calls it; set MKL_CBWR to override.
os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

__version__ = "0.1.0"
