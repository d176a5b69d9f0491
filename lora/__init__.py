"""lora: LoRA / QLoRA layers, model surgery and peft-compatible adapters, without peft.

    import lora
    cfg = lora.LoRAConfig(r=16, alpha=32, dropout=0.05, target_modules="all-linear")
    model = lora.apply_lora(model, cfg, quantize=True)      # QLoRALinear: 4-bit NF4 base
    print(lora.trainable_report(model))
    opt = torch.optim.AdamW(lora.adapter_parameters(model).values(), lr=2e-4)
    lora.save_adapter(model, "out/")                          # peft's file layout
    lora.load_adapter(model, "out/")
    errors = lora.merge(model)                                # {layer: re-quantization error}
    lora.unmerge(model)
    lora.merged_state_dict(model, torch.bfloat16)             # dense merged model, for serving
    model = lora.load_quantized(model_on_meta, "ckpt/")       # transformers + bnb 4-bit, or 16-bit
    lora.save_quantized(model, "out/")                        # a folder transformers + bnb load
    model = lora.from_bnb(bnb_model)                         # transformers + bitsandbytes 4-bit -> ours, no copy

Each layer computes ``y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ`` with A: [r, K], B: [N, r],
s = alpha / r (or alpha / sqrt(r) with rsLoRA); QLoRA layers run it through
``kernels.qlora_linear`` on a 4-bit base.
"""

from .adapters import load_adapter, load_adapter_config, save_adapter
from .bnb_bridge import from_bnb
from .config import ALL_LINEAR, LoRAConfig
from .checkpoint import load_quantized
from .checkpoint_save import save_quantized
from .layers import LoRALayer, LoRALinear
from .memory import PeakMemory
from .merging import disable_adapter, merge, merged_state_dict, unload, unmerge
from .qlinear import QLoRALinear
from .quantized_linear import QuantizedLinear
from .surgery import (
    TrainableReport,
    adapter_parameters,
    apply_lora,
    lora_layers,
    mark_only_lora_trainable,
    trainable_report,
    upcast_norms,
)
from .targets import find_targets, output_layer_name

__all__ = [
    "LoRAConfig", "ALL_LINEAR", "LoRALayer", "LoRALinear", "QLoRALinear", "QuantizedLinear", "apply_lora",
    "find_targets", "load_quantized", "save_quantized", "merged_state_dict",
    "output_layer_name", "lora_layers", "adapter_parameters", "mark_only_lora_trainable", "TrainableReport",
    "trainable_report", "merge", "unmerge", "disable_adapter", "unload", "upcast_norms",
    "save_adapter", "load_adapter", "load_adapter_config", "PeakMemory", "from_bnb",
]
