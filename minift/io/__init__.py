"""File formats: safetensors (atomic writes), model folders (minift's and Hugging Face's), GGUF,
tokenizer.json, and ``hub.py`` (fetching a known model file once into the cache).
"""

from minift.io.gguf import GGUFError, load_gguf
from minift.io.model_dir import load_hf_folder, load_model, read_model, save_model
from minift.io.safetensors import SafetensorsError, atomic_write_bytes, load_file, save_file

__all__ = ["GGUFError", "SafetensorsError", "atomic_write_bytes", "load_file", "load_gguf", "load_hf_folder",
           "load_model", "read_model", "save_file", "save_model"]
