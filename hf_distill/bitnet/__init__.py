"""BitNet b1.58 students: ternary `BitLinear` layers, conversion, and the lambda warm-up schedules."""

from .bitlinear import BitLinear
from .convert import (
    BitNetConversion,
    bitlinear_layers,
    convert_to_bitnet,
    default_modules_to_not_convert,
    set_bitnet_lambda,
)
from .load import load_bitnet_student
from .quantization import quantize_activation, quantize_weight, straight_through, ternarize, weight_scale
from .schedule import LambdaSchedule

__all__ = [
    "BitLinear",
    "BitNetConversion",
    "LambdaSchedule",
    "bitlinear_layers",
    "convert_to_bitnet",
    "default_modules_to_not_convert",
    "load_bitnet_student",
    "quantize_activation",
    "quantize_weight",
    "set_bitnet_lambda",
    "straight_through",
    "ternarize",
    "weight_scale",
]
