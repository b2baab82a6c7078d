"""Architectures; importing this package registers every builder."""
from pyconv_core.models import resnet  # noqa: F401
from pyconv_core.models import inception  # noqa: F401
