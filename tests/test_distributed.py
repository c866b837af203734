"""Two Ray Train workers (DDP, gloo) give the adapter one worker gives."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_two_workers_equal_one_worker(ddp_ray) -> None:  # type: ignore[no-untyped-def]
    from clients.distributed import train_adapter_distributed
    from clients.formatting import encode_example
    from clients.resident import get_resident
    from clients.silo import virtual_silo
    from clients.trainer import TrainSettings, train_adapter
    from protos.adapter import LoraSpec

    spec = LoraSpec(rank=4, alpha=8.0)
    resident = get_resident("tiny-llama", spec)
    silo = virtual_silo("bbc-news", 0, 3, max_records=24)
    examples = [encode_example(resident.tokenizer, e.prompt, e.answer, 96) for e in silo.examples]
    start = resident.adapter()
    # fp32: bf16 rounding would differ between a batch of 4 and two batches of 2
    settings = TrainSettings(local_steps=4, batch_size=4, learning_rate=1e-2, seed=3, autocast_bf16=False)
    single, _ = train_adapter(resident, start, examples, settings)
    double, metrics = train_adapter_distributed("tiny-llama", spec, start, examples, settings, num_workers=2)
    assert metrics["train_workers"] == 2.0
    moved = max(float(np.abs(single[k] - start[k]).max()) for k in start)
    assert moved > 1e-3, "training did not move the adapter: the comparison would be vacuous"
    for name in single:
        np.testing.assert_allclose(double[name], single[name], rtol=1e-4, atol=1e-5, err_msg=name)
