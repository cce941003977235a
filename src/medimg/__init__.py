"""medimg: reproducible training, comparison and promotion of medical-image classifiers."""

__version__ = "0.1.0"
