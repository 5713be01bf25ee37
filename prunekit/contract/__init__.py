"""The contract between the neutral core and a backend: the tensor ops, their NumPy reference,
the model handle, the layer view, the backend protocol and registry, the reference-model catalogue.
"""
