"""vsfcl: flatness-aware continual learning and SGD loss-landscape analysis."""

__version__ = "0.1.0"
