"""The PyTorch backend (CPU and CUDA).

``BACKEND`` is its :class:`prunekit.contract.backend.Backend` (what the core uses, through
``prunekit.contract.backend.get_backend("torch")``); the names below are for users' own code.
"""
from .runtime import configure_process

configure_process()

from .driver import PruningSession, Trainer  # noqa: E402
from .optimizers import make_optimizer  # noqa: E402
from .layers import TorchModelHandle, discover_layers  # noqa: E402
from .compact import compact  # noqa: E402
from .timing import time_inference  # noqa: E402
from .models import build_model  # noqa: E402
from .surgery import apply_decompositions  # noqa: E402
from .ops import TorchOps  # noqa: E402
from .backend import TorchBackend  # noqa: E402

BACKEND = TorchBackend()
Ops = TorchOps
#: a reference model with the shared seeded initialisation, in a handle (:meth:`TorchBackend.model_handle`)
model_handle = BACKEND.model_handle
