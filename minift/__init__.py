"""minift: what actually happens inside LLM fine-tuning, written out in NumPy.

Start reading at ``minift/autograd`` (the engine), then ``minift/nn`` and ``minift/models``;
docs/design.md draws the layers. The names below are imported on first use (PEP 562), so
``import minift.autograd`` loads the engine and NumPy, nothing else.
"""

import importlib
import os

# Before anything loads NumPy: OpenBLAS's worker threads sleep as soon as a matrix product ends
# instead of spinning on their cores for up to 2^28 cycles, so the elementwise row blocks that
# follow each product (minift/autograd/parallel.py) find the second core free. Measured on 2
# cores: products as fast as before, the split ops 9-24 % faster (docs/benchmarks.md, "At two
# threads"). Only a default: a value already in the environment wins; if NumPy was imported
# before minift, OpenBLAS has read its setting already and this changes nothing.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__version__ = "0.1.0"

#: public name -> the module that owns it
_EXPORTS = {
    "Tensor": "minift.autograd",
    "no_grad": "minift.autograd",
    "get_backend": "minift.backend",
    "set_backend": "minift.backend",
    "load_pretrained": "minift.training.pretrained",
}

__all__ = ["Tensor", "__version__", "get_backend", "load_pretrained", "no_grad", "set_backend"]  # tests/test_layers.py


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minift' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
