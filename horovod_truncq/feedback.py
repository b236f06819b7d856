"""Error feedback: what the quantizer dropped last step is added to this step's input.

    x_t = g_t + e_t,  e_{t+1} = decay * (x_t - Q(x_t))

With truncation the residual carries the clipped tails into later steps, so the decoded gradients
average to the true ones over time instead of staying biased. One residual per quantized input:
per bucket (the rows a rank quantizes), and one for the owner's re-quantization of its chunk. Residuals take 4 bytes per element, on the
gradient's device. A non-finite input (NaN or Inf) leaves no residual: it restarts at zero.

decay = 1 is the classic rule: nothing is lost, but what truncation clips from the few largest
elements piles up in their residuals and arrives many steps late, which can destabilise training at
a high learning rate (`launch/feedback.sh` measures it). decay < 1 forgets a share of the residual
each step, so nothing waits longer than a few steps, at the price of part of the bias coming back.
"""
from __future__ import annotations

import torch


class ErrorFeedback:
    """The residuals of one rank, keyed by the stream names the exchange encodes under."""

    def __init__(self, decay: float = 1.0) -> None:
        self.decay = decay
        self.residuals: dict[str, torch.Tensor] = {}

    def corrected(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """x plus the residual kept under `key` (x itself the first time)."""
        residual = self.residuals.get(key)
        if residual is None:
            return x
        if residual.shape != x.shape:
            raise ValueError(f"error feedback: {key!r} had shape {tuple(residual.shape)} last step and "
                             f"{tuple(x.shape)} now; the quantized tensors must keep their sizes")
        return x + residual.to(x.device)

    def update(self, key: str, x: torch.Tensor, sent: torch.Tensor) -> None:
        """Keep decay * (x - sent), sent being the dequantized value that travelled, for the next step."""
        residual = (x - sent) * self.decay
        self.residuals[key] = torch.where(torch.isfinite(residual), residual, 0.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.clone() for key, value in self.residuals.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Residuals saved by `state_dict`; they move to the gradient's device on first use."""
        self.residuals = {key: value.to(torch.float32).clone() for key, value in state.items()}
