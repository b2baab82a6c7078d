"""Architectures; importing this package registers every builder."""

# The import order is the registration order, i.e. list_models() order: keep it.
# isort: off
from pyconv_core.models import resnet  # noqa: F401
from pyconv_core.models import inception  # noqa: F401
from pyconv_core.models import ssd  # noqa: F401
from pyconv_core.models import segmentation  # noqa: F401
from pyconv_core.models import video  # noqa: F401
# isort: on
