"""The BitNet b1.58 quantizers: absmean ternary weights and per-token absmax activations.

Both follow the formulas of the BitNet b1.58 paper (arXiv 2402.17764) with the exact arithmetic of transformers'
`integrations/bitnet.py` (`WeightQuant`, `ActQuant`), so that a student trained here and reloaded by stock
transformers (`AutoBitLinear`, or the packed `BitLinear`) computes the same numbers:

- weights: `s = 1 / max(mean|W|, eps)`, `Q(W) = clamp(round(W * s), -1, 1) / s`: every entry is one of
  `{-alpha, 0, +alpha}` with `alpha = 1 / s` (one scale per tensor);
- activations: per token (last dimension) `s = 127 / max(max|x|, eps)`, `Q(x) = clamp(round(x * s), -128, 127) / s`.

Both are computed in float32 and cast back to the input dtype.
"""

from __future__ import annotations

import torch

EPS = 1e-5
"""Lower bound of the weight mean and the activation maximum (transformers uses the same)."""


def weight_scale(weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The ternary scale `alpha = max(mean|W|, eps)` of a weight tensor, as a float32 scalar.

    Args:
        weight (`torch.Tensor`): A weight matrix (any dtype).
        eps (`float`, *optional*, defaults to `1e-5`): Lower bound of the mean.

    Returns:
        `torch.Tensor`: 0-d float32 tensor.
    """
    return weight.detach().float().abs().mean().clamp(min=eps)


def ternarize(weight: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes and scale of a weight tensor: `Q(W) = codes * alpha`.

    Args:
        weight (`torch.Tensor`): A weight matrix.
        eps (`float`, *optional*, defaults to `1e-5`): Lower bound of the mean.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `int8` codes in `{-1, 0, 1}` (the shape of `weight`) and the float32 scale
        `alpha` (0-d), `1 / (1 / mean|W|)`: equal to `mean|W|` up to one rounding, and exactly the magnitude of the
        non-zero entries of `Q(W)`.
    """
    inv = 1.0 / weight_scale(weight, eps)
    codes = (weight.detach().float() * inv).round().clamp(-1, 1).to(torch.int8)
    return codes, 1.0 / inv  # `codes * (1 / inv)` is bit-identical to `Q(W) = codes / inv`


def quantize_weight(weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Absmean ternary fake-quantization `Q(W)` (no gradient; see [`BitLinear`] for the straight-through estimator).

    Args:
        weight (`torch.Tensor`): A weight matrix.
        eps (`float`, *optional*, defaults to `1e-5`): Lower bound of the mean.

    Returns:
        `torch.Tensor`: `Q(W)` in the dtype of `weight`; its entries take at most three values `{-alpha, 0, alpha}`.
    """
    w = weight.detach().float()
    scale = 1.0 / w.abs().mean().clamp(min=eps)
    return ((w * scale).round().clamp(-1, 1) / scale).to(weight.dtype)


def quantize_activation(x: torch.Tensor, bits: int = 8, eps: float = EPS) -> torch.Tensor:
    """Per-token absmax fake-quantization of activations to signed `bits`-bit integers (no gradient).

    Args:
        x (`torch.Tensor`): Activations `[..., features]`; each row along the last dimension has its own scale.
        bits (`int`, *optional*, defaults to `8`): Integer width.
        eps (`float`, *optional*, defaults to `1e-5`): Lower bound of a row's maximum.

    Returns:
        `torch.Tensor`: `Q(x)` in the dtype of `x`.
    """
    qmax = 2 ** (bits - 1) - 1
    a = x.detach().float()
    scale = qmax / a.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    return ((a * scale).round().clamp(-qmax - 1, qmax) / scale).to(x.dtype)


def straight_through(x: torch.Tensor, quantized: torch.Tensor, strength: float) -> torch.Tensor:
    """`x + strength * (Q(x) - x).detach()`, the warm-up mix with a straight-through gradient.

    The value is exactly `x` at `strength = 0` and exactly `Q(x)` at `strength = 1`; the gradient with respect to `x`
    is the identity for every strength.

    Args:
        x (`torch.Tensor`): The full-precision tensor (carries the gradient).
        quantized (`torch.Tensor`): `Q(x)`, detached.
        strength (`float`): The warm-up factor lambda in `[0, 1]`.

    Returns:
        `torch.Tensor`
    """
    target = torch.lerp(x.detach(), quantized, strength) if strength < 1.0 else quantized
    return (x - x.detach()) + target
