"""delving: a reproduction of He, Zhang, Ren & Sun (2015), "Delving Deep into Rectifiers"."""

__version__ = "0.1.0"
