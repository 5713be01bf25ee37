"""Framework adapters, and the registrations of the built-in ones.

One sub-package per framework, with the same file names in each:

* ``backend.py`` the :class:`prunekit.contract.backend.Backend` the core talks to (``BACKEND`` in
  the package): a :class:`prunekit.backends.common.DelegatingBackend` bound to the package, whose
  members call the files below; the file holds only what differs per framework
* ``runtime.py`` ``configure_process()``: the process-wide settings the package applies on import
* ``ops.py``     the neutral tensor API (:class:`prunekit.contract.ops.Ops`) on the framework's tensors
* ``layers.py``  discovery of prunable layers and the :class:`prunekit.contract.handle.ModelHandle`
* ``models.py``  the reference models, one parameter-naming scheme across frameworks
* ``zoo.py``     models named by a source (``torchvision:resnet18``, ``mindcv:...``, ``package.module:function``)
  and weight files in the framework's own format
* ``driver.py``  training-loop integration: the session's tensor work (masking gradients, optimizer
  state and weights; the life cycle is :mod:`prunekit.app.session`'s) and the ``Trainer``
* ``fused.py``   fused paths of the driver (multi-tensor ops; compiled graphs)
* ``integrations.py`` framework integrations (Lightning's callback; ``Model.train``'s cell and callback)
* ``optimizers.py`` ``make_optimizer`` and framework-native optimizers (``SDPrun``)
* ``compact.py``, ``channels.py``, ``export.py``, ``timing.py``, ``distributed.py``: the framework
  parts of :mod:`prunekit.decisions.compaction`, :mod:`prunekit.decisions.channel_groups`,
  :mod:`prunekit.app.export`, :mod:`prunekit.app.timing`, :mod:`prunekit.app.session`'s data parallel

``common.py`` beside them holds what every ``backend.py`` shares (:class:`DelegatingBackend`).

Only the sub-packages import a framework. This file does not: the core's registry
(:mod:`prunekit.contract.backend`) reads :data:`BUILTIN` from it to know the built-in backends,
their aliases, launchers and export formats without importing any framework.
"""
from prunekit.contract.backend import BackendSpec

#: the built-in backends, registered first (in this order)
BUILTIN = (
    BackendSpec(
        name="torch", module="prunekit.backends.torch", framework="torch", title="PyTorch",
        aliases=("pytorch",), default=True,
        launcher="torchrun --nproc_per_node=N -m prunekit run ...",
        export_formats={"onnx": ".onnx", "torch": ".pt"},
        weight_suffixes=(".pt", ".pth"), model_sources={"torchvision": "torchvision", "timm": "timm"}),
    BackendSpec(
        name="mindspore", module="prunekit.backends.mindspore", framework="mindspore", title="MindSpore",
        aliases=("ms",),
        # msrun starts every worker (and its scheduler) as `python <script>` with the `python` first
        # on PATH, whatever interpreter runs msrun: VENV/bin first on PATH makes it the environment's
        launcher="msrun --worker_num=N --local_worker_num=N --join=True VENV/bin/prunekit run ... with the "
                 "environment's bin first on PATH (PATH=VENV/bin:$PATH msrun ...): msrun starts its workers "
                 "with the python on PATH",
        export_formats={"mindir": ".mindir", "mindspore-ckpt": ".ckpt"},
        weight_suffixes=(".ckpt",), model_sources={"mindcv": "mindcv"}),
)
