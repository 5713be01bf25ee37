"""The MindSpore backend (CPU, GPU and Ascend; PyNative and GRAPH_MODE).

Importing it configures the process once (device, oneDNN and NumPy BLAS caps on CPU): see
:func:`prunekit.backends.mindspore.runtime.configure_process`. ``BACKEND`` is its
:class:`prunekit.contract.backend.Backend` (what the core uses, through
``prunekit.contract.backend.get_backend("mindspore")``); the names below are for users' own code.
"""
from .runtime import configure_process

configure_process()

from .driver import PruningSession, Trainer  # noqa: E402
from .integrations import Pruner, PruningCallback, PruningTrainOneStepCell  # noqa: E402
from .optimizers import Adam, make_optimizer  # noqa: E402
from .layers import MindSporeModelHandle, discover_layers  # noqa: E402
from .compact import compact  # noqa: E402
from .timing import time_inference  # noqa: E402
from .models import build_model  # noqa: E402
from .ops import MindSporeOps, check_device  # noqa: E402
from .surgery import apply_decompositions  # noqa: E402
from .backend import MindSporeBackend  # noqa: E402

BACKEND = MindSporeBackend()
Ops = MindSporeOps
#: a reference model with the shared seeded initialisation, in a handle (:meth:`MindSporeBackend.model_handle`)
model_handle = BACKEND.model_handle
