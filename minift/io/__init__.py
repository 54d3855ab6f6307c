"""File formats: safetensors (atomic writes) and saved model folders."""

from minift.io.model_dir import load_model, save_model
from minift.io.safetensors import SafetensorsError, atomic_write_bytes, load_file, save_file

__all__ = ["SafetensorsError", "atomic_write_bytes", "load_file", "load_model", "save_file", "save_model"]
