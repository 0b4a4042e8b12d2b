"""compressor: model compression and pruning for PyTorch and ONNX models.

Entry points: `compress(model, recipe, data=..., output=...)`, `evaluate_model(model, data)`,
`analyze(model)` (the ONNX dependency-graph analyser). Recipe methods are callable on their own from
`compressor.methods.<name>`.
"""

__version__ = "0.1.0"


def compress(*args, **kwargs):
    from compressor.api import compress as _compress

    return _compress(*args, **kwargs)


def evaluate_model(*args, **kwargs):
    from compressor.api import evaluate_model as _evaluate_model

    return _evaluate_model(*args, **kwargs)


def analyze(*args, **kwargs):
    from compressor.api import analyze as _analyze

    return _analyze(*args, **kwargs)


compress.__doc__ = "Compress a model with a recipe; see compressor.api.compress."
evaluate_model.__doc__ = "Measure a model; see compressor.api.evaluate_model."
analyze.__doc__ = "Coupled channel groups of any supported model (ONNX directly, others exported first); see compressor.api.analyze."
