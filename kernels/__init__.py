"""The frozen base model: loading, adapters attached to it, and (later) its quantized forms.

Torch lives here and in the GPU client only. The edge path (ONNX Runtime) will get its own
torch-free modules; nothing in this package may be imported by ``protocols``.
"""
