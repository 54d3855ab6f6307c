"""File formats: safetensors checkpoints (atomic writes)."""

from minift.io.safetensors import SafetensorsError, atomic_write_bytes, load_file, save_file

__all__ = ["SafetensorsError", "atomic_write_bytes", "load_file", "save_file"]
