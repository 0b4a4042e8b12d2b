"""compressor: model compression and pruning for PyTorch and ONNX models."""
__version__ = "0.1.0"
