"""`BitLinear`: a drop-in `nn.Linear` that trains ternary weights and 8-bit activations with a warm-up factor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantization import EPS, quantize_activation, quantize_weight, straight_through, ternarize


class BitLinear(nn.Linear):
    """A linear layer with BitNet b1.58 quantization-aware training.

    The latent weight stays in full precision (the optimizer updates it); the forward pass uses

    - `W + weight_lambda * (Q(W) - W).detach()` with the absmean ternary `Q(W)` (one scale per tensor), and
    - `x + activation_lambda * (Q(x) - x).detach()` with the per-token absmax 8-bit `Q(x)`,

    so the gradient flows straight through the quantizers. With both lambdas at 0 the layer is exactly
    `nn.Linear`; with both at 1 it computes exactly what transformers' `AutoBitLinear` (`online` mode) computes. The
    lambdas are plain attributes set by [`BitNetCallback`] from its schedule at every step.

    It subclasses `nn.Linear` and keeps its parameter names (`weight`, `bias`), so optimizers, PEFT target names,
    checkpoints and `state_dict` keys are the same as the model it was converted from.

    Args:
        in_features (`int`): Input features.
        out_features (`int`): Output features.
        bias (`bool`, *optional*, defaults to `True`): Whether the layer has a bias (kept in full precision).
        activation_bits (`int`, *optional*, defaults to `8`): Width of the activation integers.
        device, dtype: As for `nn.Linear`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation_bits: int = 8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation_bits = activation_bits
        self.weight_lambda = 1.0
        self.activation_lambda = 1.0

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation_bits: int = 8) -> BitLinear:
        """Convert an `nn.Linear`, sharing its `weight` and `bias` parameters (no copy, same device and dtype).

        Args:
            linear (`nn.Linear`): The layer to convert.
            activation_bits (`int`, *optional*, defaults to `8`): Width of the activation integers.

        Returns:
            `BitLinear`: The new layer, in training mode if `linear` was.
        """
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer.activation_bits = activation_bits
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses at the current `weight_lambda` (no gradient)."""
        w = self.weight.detach()
        return w if self.weight_lambda == 0 else straight_through(w, quantize_weight(w, EPS), self.weight_lambda)

    def ternary_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fully quantized weight as `int8` codes in `{-1, 0, 1}` and its float32 scale `alpha` (0-d).

        `codes * alpha` equals `Q(W)`, the weight of the layer at `weight_lambda = 1`; this is what the exports store.
        """
        return ternarize(self.weight, EPS)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.weight_lambda > 0:
            weight = straight_through(weight, quantize_weight(weight, EPS), self.weight_lambda)
        if self.activation_lambda > 0:
            input = straight_through(
                input, quantize_activation(input, self.activation_bits, EPS), self.activation_lambda
            )
        return F.linear(input, weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, activation_bits={self.activation_bits}, "
            f"weight_lambda={self.weight_lambda:g}, activation_lambda={self.activation_lambda:g}"
        )
