"""Keel training: reward models from human feedback, and RLHF for policies."""

__version__ = "0.1.0"
