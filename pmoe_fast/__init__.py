"""pmoe_fast: fast kernels and models for pMoE, Mixture-of-Experts prompt tuning of frozen ViTs."""

__version__ = "0.1.0"
