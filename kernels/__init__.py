"""The frozen base model: loading, adapters attached to it, its quantized forms and ONNX export.

Torch lives here, in the torch client and in the coordinator's central evaluation. The edge
path has its own torch-free module, :mod:`kernels.edge_runtime` (checked by
``tests/test_packaging.py``); nothing in this package may be imported by ``protocols``.
"""
