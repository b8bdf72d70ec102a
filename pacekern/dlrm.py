"""`from pacekern.dlrm import ...`: the public API of the dlrm package (DLRMv2 with INT8 inference
on pacekern kernels), re-exported; see dlrm/__init__.py."""
from dlrm import *  # noqa: F401,F403
from dlrm import __all__, __getattr__  # noqa: F401
