"""What a run carries from step to step, in one object, and the check that the ranks agree on it.

State holds the settings, the seed and rank that key the rounding noise, one step counter, the
error-feedback residuals and the byte counter. `state_dict()` is what a checkpoint needs to resume
bit for bit; it belongs to this rank.
"""
from __future__ import annotations

import hashlib
import logging
import random
from typing import Optional, Union

import torch

from . import noise
from .feedback import ErrorFeedback
from .groups import Group
from .traffic import TrafficCounter

log = logging.getLogger("horovod_truncq")
_DESCRIPTION_BYTES = 1024


def front_end_options(min_elements: int, error_feedback: Union[bool, float]) -> float:
    """Check the options both front ends take; the share of the residual error feedback keeps (0: off)."""
    if isinstance(min_elements, bool) or not isinstance(min_elements, int) or min_elements < 0:
        raise ValueError(f"min_elements must be an int >= 0, got {min_elements!r}")
    if not (isinstance(error_feedback, bool) or
            isinstance(error_feedback, (int, float)) and 0 < error_feedback <= 1):
        raise ValueError(f"error_feedback must be True, False or the share of the residual kept, in (0, 1]; "
                         f"got {error_feedback!r}")
    return float(error_feedback)


class State:
    """One rank's state of a quantized exchange.

    Args:
        settings: a description of every setting the ranks must share (compared by `agree`).
        seed: the noise seed (the quantizer's, or a random one when it has none).
        rank: this rank; ranks draw independent noise.
        feedback_decay: the share of the residual kept under error feedback; 0 for none.
    """

    def __init__(self, settings: str, seed: Optional[int], rank: int, feedback_decay: float = 0.0) -> None:
        self.settings = settings
        self.seed = seed if seed is not None else random.SystemRandom().getrandbits(62)
        self.rank = rank
        self.step = 0
        self.feedback = ErrorFeedback(feedback_decay) if feedback_decay else None
        self.traffic = TrafficCounter()

    def key(self, stream: str) -> tuple[int, int]:
        """The noise key of `stream` at the current step."""
        return noise.stream_key(self.seed, self.rank, stream, self.step)

    def state_dict(self) -> dict:
        return {"rank": self.rank, "seed": self.seed, "step": self.step,
                "residuals": self.feedback.state_dict() if self.feedback is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`. A state saved by another rank (rank 0's checkpoint loaded
        everywhere) keeps this rank's seed, takes the step, and drops the residuals with a warning:
        they restart at zero."""
        self.step = state["step"]
        if state["rank"] != self.rank:
            if state["residuals"]:
                log.warning("horovod_truncq: rank %d loaded the state of rank %d; its error-feedback residuals "
                            "are dropped and restart at zero (save every rank's state to resume exactly)",
                            self.rank, state["rank"])
            if self.feedback is not None:
                self.feedback.load_state_dict({})
            return
        self.seed = state["seed"]
        if self.feedback is not None:
            self.feedback.load_state_dict(state["residuals"])


def agree(group: Group, description: str, name: str = "truncq.settings") -> None:
    """Raise the same ValueError on every rank of `group` if their descriptions differ. Two small
    allgathers, both of the same size on every rank, so no rank waits for a collective that never comes."""
    digest = torch.tensor(list(hashlib.blake2b(description.encode(), digest_size=16).digest()), dtype=torch.uint8)
    digests = group.allgather(digest.view(1, -1), f"{name}.digest").wait()
    if bool((digests == digests[0]).all()):
        return
    raw = description.encode()[:_DESCRIPTION_BYTES].ljust(_DESCRIPTION_BYTES)
    texts = group.allgather(torch.tensor(list(raw), dtype=torch.uint8).view(1, -1), f"{name}.text").wait()
    lines = "\n".join(f"  rank {r}: {bytes(row.tolist()).decode(errors='replace').strip()}"
                      for r, row in enumerate(texts))
    raise ValueError(f"horovod_truncq: the ranks disagree on the compressor settings (ranks are numbered "
                     f"within the group):\n{lines}")
