from .pllava import PllavaModel

__all__ = ["PllavaModel"]
