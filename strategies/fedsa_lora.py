"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in
Federated Learning", ICLR 2025).

The paper finds that A learns what is general across clients and B what is
client-specific. So both are trained, but only A is shared and averaged; each
organization keeps its own B, which never leaves the silo.

Updates carry only the ``lora_A`` tensors; ``finish_round`` returns the whole
adapter with the averaged A and the global's B unchanged (its initial value:
the server never sees a trained B). An organization loads the global A and
keeps its local B.
"""

from __future__ import annotations

from protos.adapter import LORA_A, LORA_B
from strategies.partial_share import PartialShare
from strategies.registry import register_strategy


@register_strategy("fedsa-lora")
class FedSaLora(PartialShare):
    """Example-weighted mean of A; B stays local (updates hold only lora_A).

    Parameters: none.
    """

    factor_plan = {"train": (LORA_A, LORA_B), "share": (LORA_A,)}
