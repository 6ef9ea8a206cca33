"""perfusion: personalize text-to-image diffusion models with Perfusion (arXiv 2305.01644)."""

__version__ = "0.1.0"
