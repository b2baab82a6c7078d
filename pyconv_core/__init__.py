"""PyConv workbook: pyramidal convolution networks for classification, detection, video and
segmentation (Duta et al. 2020, arXiv 2006.11538)."""

import pyconv_core.models  # noqa: F401  (registers every builder before any use of the registry)
from pyconv_core.models.official import CheckpointMismatchError, load_official_checkpoint, to_official_state_dict
from pyconv_core.registry import build, list_models

__all__ = ["build", "list_models", "load_official_checkpoint", "to_official_state_dict", "CheckpointMismatchError"]
