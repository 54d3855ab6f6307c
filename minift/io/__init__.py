"""File formats: safetensors (atomic writes), saved model folders, GGUF, tokenizer.json."""

from minift.io.gguf import GGUFError, load_gguf
from minift.io.model_dir import load_model, save_model
from minift.io.safetensors import SafetensorsError, atomic_write_bytes, load_file, save_file

__all__ = ["GGUFError", "SafetensorsError", "atomic_write_bytes", "load_file", "load_gguf", "load_model",
           "save_file", "save_model"]
