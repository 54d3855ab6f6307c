"""``Linear4bit``: a linear layer whose frozen weight is stored in NF4 — the base layer of QLoRA.

QLoRA (Dettmers et al. 2023; lecture 004) keeps the pretrained weight W in 4 bits and never
updates it; the trainable LoRA adapters on top stay in float. A forward pass therefore needs W
only for a moment:

    W = dequantize(codes, absmax)          a float temporary, block by block from the NF4 codes
    y = x W^T + b                          then W is dropped

and the backward pass needs it once more, for the gradient that flows on to the layers below:

    dx = g W                               W dequantized again, not kept from the forward
    dW                                     never computed: the 4-bit weight is frozen

So between steps the layer holds only its packed codes and their QuantState (4.127 bits per
weight), never a float copy of W — that is the whole memory saving of QLoRA over LoRA (lecture
003: a 7B base in 3.6 GB instead of 14 GB). The price is dequantizing twice per step.
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy

from minift.cuda import cpu_decode, kernels
from minift.cuda.emulator import EmulatorBuildError
from minift.nn.decoded import DecodedLinear
from minift.nn.layers import Linear
from minift.nn.module import Module, Parameter
from minift.quant.nf4 import DEFAULT_BLOCKSIZE, dequantize_nf4, dequantize_nf4_by_byte, quantize_nf4


def on_gpu(array) -> bool:
    return kernels.is_cupy_array(array)


#: Set to "numpy" to decode NF4 on the CPU with ``dequantize_nf4_by_byte`` instead of the compiled
#: loop (benchmarks, tests, or a machine where the compiled one misbehaves).
DECODER_ENV = "MINIFT_NF4_DECODER"


@functools.cache
def compiled_decoder_builds() -> bool:
    """Whether kernels/nf4_decode_cpu.cpp builds and loads here; asked once per process. A machine
    without a working compiler must still train, only slower: it gets one warning, naming what
    failed, and the NumPy decoder from then on."""
    try:
        cpu_decode.library()
    except (EmulatorBuildError, OSError) as exc:
        warnings.warn(f"minift/nn/linear4bit.py: the compiled NF4 decoder (kernels/{cpu_decode.SOURCE}) could not "
                      f"be built, so NF4 weights are decoded by NumPy (dequantize_nf4_by_byte, several times "
                      f"slower). Set $CXX to a working C++20 compiler to get it back. The error: {exc}",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


def cpu_decoder():
    """The CPU decoder ``Linear4bit`` runs: ``dequantize_nf4_compiled`` (a compiled SIMD loop,
    minift/cuda/cpu_decode.py), or ``dequantize_nf4_by_byte`` (NumPy: a table per byte) when
    ``$MINIFT_NF4_DECODER`` is "numpy" or the compiled one cannot be built. Both split the
    weight over as many threads as the BLAS (``minift --threads``)."""
    choice = os.environ.get(DECODER_ENV, "compiled")
    if choice not in ("compiled", "numpy"):
        raise ValueError(f"${DECODER_ENV}={choice!r}: set it to 'compiled' (the default) or 'numpy'")
    if choice == "compiled" and compiled_decoder_builds():
        return cpu_decode.dequantize_nf4_compiled
    return dequantize_nf4_by_byte


def dequantize(packed, state, dtype):
    """NF4 codes -> float weight, by the fastest decoder for where the codes live: on a GPU the
    CUDA kernel (kernels/nf4_dequant.cu; float32 and float16) or else the plain
    ``dequantize_nf4``; on the CPU ``cpu_decoder()`` (the compiled loop, or NumPy's table per
    byte). All of them agree bit for bit."""
    if not on_gpu(packed):
        return cpu_decoder()(packed, state, dtype=dtype)
    if numpy.dtype(dtype) in (numpy.float32, numpy.float16):
        return kernels.dequantize_nf4(packed, state, dtype=dtype)
    return dequantize_nf4(packed, state, dtype=dtype)


class NF4Linear(DecodedLinear):
    """y = x W^T + b with W held as NF4 codes (``packed``, ``state``) and dequantized for each
    product, forward and backward (``DecodedLinear``, minift/nn/decoded.py: no dW, no float W kept)."""

    op = "linear4bit"

    @staticmethod
    def decode(dtype, *, packed, state):
        return dequantize(packed, state, dtype=dtype)


class Linear4bit(Module):
    """A frozen NF4 weight (packed codes + ``quant_state``, not a Parameter) and an optional float
    bias (a Parameter). ``compute_dtype`` is the float type W is dequantized to, and the dtype a
    LoRA adapter on top of this layer is made in."""

    def __init__(self, packed, quant_state, bias: Parameter | None = None, compute_dtype=numpy.float32):
        super().__init__()
        if len(quant_state.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D (out, in) weight, got shape {quant_state.shape}")
        self.packed, self.quant_state = packed, quant_state
        self.bias = bias
        self.compute_dtype = numpy.dtype(compute_dtype)

    @classmethod
    def from_linear(cls, linear: Linear, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True) -> Linear4bit:
        """Quantize ``linear``'s weight to NF4; its bias is kept as it is (same Parameter)."""
        packed, state = quantize_nf4(linear.weight.data, blocksize, double_quant)
        return cls(packed, state, linear.bias, compute_dtype=linear.weight.dtype)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.quant_state.shape

    @property
    def out_features(self) -> int:
        return self.quant_state.shape[0]

    @property
    def in_features(self) -> int:
        return self.quant_state.shape[1]

    @property
    def blocksize(self) -> int:
        return self.quant_state.blocksize

    @property
    def num_frozen_weights(self) -> int:
        """The weights this layer stores in 4 bits: not Parameters, but part of the model's size
        (``Module.num_parameters`` counts them, so QLoRA's trainable % is not overstated)."""
        out_features, in_features = self.quant_state.shape
        return out_features * in_features

    @property
    def double_quant(self) -> bool:
        return self.quant_state.nested

    def dequantized_weight(self, dtype=None):
        """A fresh float (out, in) array of W as the 4 bits encode it (``compute_dtype`` by default)."""
        return dequantize(self.packed, self.quant_state, dtype=dtype or self.compute_dtype)

    def requantize(self, weight) -> None:
        """Store ``weight`` (out, in) in NF4 in place of the current one, with the same block size
        and double quantization. What comes back out is ``weight`` plus a new rounding error."""
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"requantize: weight of shape {tuple(weight.shape)} for a layer of shape "
                             f"{self.weight_shape}")
        self.packed, self.quant_state = quantize_nf4(weight, self.blocksize, self.double_quant)

    def storage_nbytes(self) -> dict[str, int]:
        """Bytes held between steps, by storage type (the memory ledger's weight rows)."""
        return {"nf4 codes": int(self.packed.nbytes), "quant state": self.quant_state.nbytes,
                "fp32": 0 if self.bias is None else int(self.bias.data.nbytes)}

    def forward(self, x):
        inputs = (x,) if self.bias is None else (x, self.bias)
        return NF4Linear.apply(*inputs, packed=self.packed, state=self.quant_state)

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"Linear4bit(in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}{dq})")


def quantize_model(model: Module, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True,
                   skip: tuple[str, ...] = ("lm_head", "embed")) -> list[str]:
    """Replace every ``Linear`` of ``model`` by a ``Linear4bit`` (in place), except those whose
    dotted name contains one of ``skip``; returns the names replaced.

    The embedding (and a tied or separate output head) stays in float, as in QLoRA: it is a
    lookup table, not a matmul weight, and it is small next to the blocks. Quantize *before*
    adding LoRA adapters — the adapters are trained in float and must not be quantized.
    """
    if any(hasattr(module, "lora_A") for _, module in model.named_modules()):
        raise ValueError("quantize_model: the model already has LoRA adapters; quantize the base model "
                         "first, then add the adapters (QLoRA's order)")
    names = [name for name, module in model.named_modules()
             if isinstance(module, Linear) and not any(s in name for s in skip)]
    for name in names:
        model.set_submodule(name, Linear4bit.from_linear(model.get_submodule(name), blocksize, double_quant))
    return names


def dequantize_model(model: Module) -> list[str]:
    """Replace every ``Linear4bit`` by a float ``Linear`` holding its dequantized weight (in place).

    Used before merging a QLoRA adapter for export: merging into the float weights adds s B A
    exactly, whereas merging into the 4-bit base would round the sum to NF4 once more.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, Linear4bit)]
    for name in names:
        layer = model.get_submodule(name)
        dense = Linear(layer.in_features, layer.out_features, dtype=layer.compute_dtype)
        dense.weight = Parameter(layer.dequantized_weight(), requires_grad=False)
        dense.bias = layer.bias
        model.set_submodule(name, dense)
    return names
