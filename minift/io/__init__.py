"""File formats: safetensors (atomic writes), model folders (minift's and Hugging Face's), GGUF
(``gguf.py`` reads, ``gguf_writer.py`` writes), PEFT adapter folders, tokenizer.json, and
``hub.py`` (fetching a known model file once into the cache).
"""

from minift.io.gguf import GGUFError, load_gguf
from minift.io.gguf_writer import write_gguf
from minift.io.model_dir import load_hf_folder, read_model, save_hf_folder, save_model
from minift.io.peft_adapter import (
    AdapterFormatError,
    check_adapter,
    lora_pairs,
    lora_tensors,
    read_adapter_folder,
    write_adapter_folder,
)
from minift.io.safetensors import SafetensorsError, atomic_write_bytes, load_file, save_file

__all__ = ["AdapterFormatError", "GGUFError", "SafetensorsError", "atomic_write_bytes", "check_adapter", "load_file",
           "load_gguf", "load_hf_folder", "lora_pairs", "lora_tensors", "read_adapter_folder",
           "read_model", "save_file", "save_hf_folder", "save_model", "write_adapter_folder", "write_gguf"]
