"""neuralpath: neural path features, values and kernels of deep gated (ReLU) networks.

Lakshminarayanan and Singh, "Neural Path Features and Neural Path Kernel: Understanding the role of gates in
deep learning", NeurIPS 2020 (arXiv 2006.10529).
"""
__version__ = "0.1.0"

from . import datasets
from .nets import ConvDGN, FCDGN

__all__ = ["FCDGN", "ConvDGN", "datasets", "__version__"]
