"""wbc-trust: classify white blood cells in microscope images and tell how far to trust each answer."""

__version__ = "0.1.0"
