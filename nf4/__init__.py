"""nf4: the specification. Codebooks, blockwise 4-bit quantization with double-quantized
absmax, and bitsandbytes-compatible storage, in plain PyTorch on any device.

    qt = nf4.quantize(w, quant_type="nf4", blocksize=64, double_quant=True)
    w2 = qt.dequantize()
"""

from . import analysis, blockwise, codebooks, storage
from .codebooks import FP4, INT4, NF4, NF4_OFFSET, dynamic_map, get_codebook, normal_float_codebook
from .storage import load_file, save_file
from .tensor import QuantizedTensor, dequantize, quantize

__all__ = [
    "NF4", "FP4", "INT4", "NF4_OFFSET", "normal_float_codebook", "dynamic_map", "get_codebook",
    "QuantizedTensor", "quantize", "dequantize", "save_file", "load_file",
    "analysis", "blockwise", "codebooks", "storage",
]
