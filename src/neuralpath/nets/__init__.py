from .base import DGN, init_layers
from .conv import ConvDGN
from .fc import FCDGN

__all__ = ["DGN", "FCDGN", "ConvDGN", "init_layers"]
