"""Quantization: the bucketed uniform quantizer, quantized distillation with shadow weights
and differentiable quantization (Polino et al. 2018) and deployable quantized ONNX export (QDQ and MatMulNBits).
"""

from compressor.quant.qat import (
                                  QuantConfig,
                                  ShadowQuantizer,
                                  distillation_loss,
                                  plan_quantization,
                                  post_training_quantize,
                                  quantized_distillation,
)
from compressor.quant.quantizer import (
                                  QuantizedTensor,
                                  compression_ratio,
                                  num_levels,
                                  quantize,
                                  quantize_tensor,
)

__all__ = ["QuantizedTensor", "QuantConfig", "ShadowQuantizer", "compression_ratio", "distillation_loss", "num_levels",
           "plan_quantization", "post_training_quantize", "quantize", "quantize_tensor", "quantized_distillation"]
