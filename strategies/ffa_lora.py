"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated
Learning", ICLR 2024).

A stays frozen at its seeded initialisation (identical everywhere, never
sent); only B is trained and sent, half of LoRA's bytes when A and B are the
same size. With A common, the mean of the products is exact:
Σ wᵢ·Bᵢ·A = (Σ wᵢ·Bᵢ)·A, so averaging B is the exact aggregation (and,
being linear, it behaves well under DP noise, the paper's motivation).

Updates carry only the ``lora_B`` tensors; ``finish_round`` returns the whole
adapter with the averaged B and A unchanged.
"""

from __future__ import annotations

from protos.adapter import LORA_B
from strategies.partial_share import PartialShare
from strategies.registry import register_strategy


@register_strategy("ffa-lora")
class FfaLora(PartialShare):
    """Example-weighted mean of B; A frozen (updates hold only lora_B).

    Parameters: none.
    """

    factor_plan = {"train": (LORA_B,), "share": (LORA_B,)}
