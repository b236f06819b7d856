"""Truncated gradient quantizers for Horovod."""

__version__ = "0.1.0"
