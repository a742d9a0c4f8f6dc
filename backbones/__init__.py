"""zoo.backbones: image backbones, one file per family; importing this package registers every model with timm."""
from . import agent_deit  # noqa: F401
from . import biformer  # noqa: F401
from . import agent_pvt  # noqa: F401
from . import volo  # noqa: F401
from . import agent_swin, agent_cswin  # noqa: F401
