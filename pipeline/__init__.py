"""A declarative, graph-compiled pipeline for training large image GANs."""

__version__ = "0.1.0"
