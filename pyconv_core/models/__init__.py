"""Architectures; importing this package registers every builder."""
from pyconv_core.models import resnet  # noqa: F401
