"""Framework adapters. One sub-package per framework, with the same file names in each:

* ``ops.py``     the neutral tensor API (:class:`prunekit.contract.ops.Ops`) on the framework's tensors
* ``layers.py``  discovery of prunable layers and the :class:`prunekit.contract.handle.ModelHandle`
* ``models.py``  the reference models, one parameter-naming scheme across frameworks
* ``driver.py``  training-loop integration (masking gradients, optimizer state and weights)

Only files in here import a framework.
"""
