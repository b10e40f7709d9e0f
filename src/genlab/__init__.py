"""genlab: train, sample and evaluate image generative models with Lightning + Hydra."""

from genlab.utils.checkpoint import load

__all__ = ["load"]
__version__ = "0.1.0"
