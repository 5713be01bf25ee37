"""Cross-backend conformance suite: cases written once, run on each backend, compared.

Run it as ``prunekit conformance`` or through pytest (``tests/conformance/test_conformance.py``).
"""
