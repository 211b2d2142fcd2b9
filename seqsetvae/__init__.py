"""Sequence-of-sets variational autoencoders for clinical event data, trained on Ray."""

__version__ = "0.1.0"
