"""Layers: the PyConv layer and the 2D/3D layer factory."""

from pyconv_core.layers.pyconv import PYCONV_PRESETS, LevelSet, PyConv, split_channels

__all__ = ["PyConv", "LevelSet", "PYCONV_PRESETS", "split_channels"]
