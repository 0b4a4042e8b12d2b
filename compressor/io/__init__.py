"""Loading and saving models and data. Safe by default: no pickle unless asked for."""

from compressor.io.data import DataBundle, load_data
from compressor.io.models import LoadedModel, load_model
from compressor.wrappers import save_torch

__all__ = ["DataBundle", "LoadedModel", "load_data", "load_model", "save_torch"]
