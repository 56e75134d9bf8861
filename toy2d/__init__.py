"""The 2D fractal toy of the autoguidance paper (arXiv 2406.02507, App. C), with exact densities
and scores. Read it in this order:

    fractal.py   the exact Gaussian mixture: log-density, score, denoiser and sampler at every sigma
    model.py     the toy network, whose output is a log-density and whose score comes by autograd
    train.py     training it against the exact score; saving and loading it
    sample.py    starting points, Heun sampling with a guidance method's denoiser, the exact metrics

On top of them: guides.py (the guide recipes: which weaker model guides the main one),
reproduce.py (the paper's experiment on one seed or many) and plots.py (its figures, drawn from
arrays).
"""
from .fractal import CLASSES, GMM, gmm, tree

__all__ = ["CLASSES", "GMM", "gmm", "tree"]
