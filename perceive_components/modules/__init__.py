"""Perceive-IR guidance modules (docs/method.md §2.3, §3): CFE, SGM, PGM, PGCA/ETB and Restormer-style blocks."""
from .cfe import CFE, make_positive_view
from .pgca import ETB, PGCA, PGCABlock
from .pgm import PGM
from .restormer_blocks import GDFN, MDTA, LayerNorm2d, RestormerBlock
from .sgm import DEFAULT_DINOV2, SGM, SemanticPriors

__all__ = [
    "CFE", "DEFAULT_DINOV2", "ETB", "GDFN", "MDTA", "PGCA", "PGCABlock", "PGM", "SGM", "LayerNorm2d", "RestormerBlock",
    "SemanticPriors", "make_positive_view",
]
