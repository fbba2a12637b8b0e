"""pmoe_fast: fast kernels and models for pMoE, Mixture-of-Experts prompt tuning of frozen ViTs.

``import pmoe_fast`` works on any machine: without the compiled extension it warns once, and the
ops that need it raise an error that says how to build it.
"""

__version__ = "0.1.0"

from . import experts, fused_dispatch, fusion, reference, vit
from ._ext import extension_status
from .dispatcher import Dispatcher
from .model import PMoE

__all__ = ["Dispatcher", "PMoE", "experts", "extension_status", "fused_dispatch", "fusion", "reference", "vit"]
