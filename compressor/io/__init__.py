"""Loading models and data. Safe by default: no pickle unless asked for.

`compressor.io.data` reads data sets (layer 1); `compressor.io.models` loads model files into the model wrappers of
`compressor.wrappers`, so it sits in the wrappers' layer (see tests/test_layers.py). Import each from its module."""
