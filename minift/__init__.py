"""minift: what actually happens inside LLM fine-tuning, written out in NumPy.

Start reading at ``minift/autograd`` (the engine), then ``minift/nn`` and ``minift/models``.
"""

from minift.autograd import Tensor, no_grad
from minift.backend import get_backend, set_backend
from minift.pretrained import load_pretrained

__version__ = "0.1.0"

__all__ = ["Tensor", "get_backend", "load_pretrained", "no_grad", "set_backend", "__version__"]
