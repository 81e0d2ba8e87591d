"""The path view of any supported ReLU network: trace, deep gated network, closed-form NPK, explicit paths."""

from .dgn import ModuleDGN, from_module, module_regime
from .graph import SUPPORTED, trace
from .npk import npk_module, overlaps_module
from .paths import npf_module, npv_module

__all__ = [
    "ModuleDGN",
    "from_module",
    "module_regime",
    "trace",
    "SUPPORTED",
    "npk_module",
    "overlaps_module",
    "npf_module",
    "npv_module",
]
