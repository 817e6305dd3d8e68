"""Layers below both stages: oneDNN-backed `Linear` / `Conv2d` (subclasses of torch's, same
parameters), the folded upsampling conv, float32 GroupNorm, in-place SiLU and attention kernels.
Model code builds its networks from these and calls its modules; it never reaches into another
module's weights, so PEFT adapters, quantized replacements and hooks run as declared."""
from layers.attention import (BACKENDS, attention, attention_backend, from_tokens, get_attention_backend, image_view,
                              reference_attention, set_attention_backend, to_tokens)
from layers.basic import GroupNorm32, SiLU, Upsample, add, silu, zero_module
from layers.fused import Conv2d, Linear, compile_for_inference, drop_phase_caches, memory_format_of, runs_plain

__all__ = ["BACKENDS", "Conv2d", "GroupNorm32", "Linear", "SiLU", "Upsample", "add", "attention", "attention_backend",
           "compile_for_inference", "drop_phase_caches", "from_tokens", "get_attention_backend", "image_view", "memory_format_of", "reference_attention", "runs_plain",
           "set_attention_backend", "silu", "to_tokens", "zero_module"]
