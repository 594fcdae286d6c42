"""apigate: a fast API gateway written in Python."""

__version__ = "0.1.0"
