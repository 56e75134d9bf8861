"""The 2D fractal toy of the autoguidance paper, with exact densities and scores."""
from .fractal import CLASSES, GMM, gmm, tree

__all__ = ["CLASSES", "GMM", "gmm", "tree"]
