"""neuralpath: neural path features, values and kernels of deep gated (ReLU) networks.

Lakshminarayanan and Singh, "Neural Path Features and Neural Path Kernel: Understanding the role of gates in
deep learning", NeurIPS 2020 (arXiv 2006.10529).
"""

__version__ = "0.2.0"

from . import datasets
from .anynet import from_module
from .dlgn import DLGNVT, gate_hyperplanes
from .kernels.npk import npk, overlaps
from .kernels.ntk import ntk
from .loading import load_net, load_run
from .nets import FCDGN, ConvDGN
from .paths import npf, npv

__all__ = [
    "FCDGN",
    "ConvDGN",
    "npf",
    "npv",
    "npk",
    "overlaps",
    "ntk",
    "datasets",
    "load_net",
    "load_run",
    "from_module",
    "gate_hyperplanes",
    "DLGNVT",
    "__version__",
]
