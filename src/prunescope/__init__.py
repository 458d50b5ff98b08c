"""prunescope: make PyTorch networks sparse and show what the sparsity costs."""

__version__ = "0.1.0"
