"""Rank reduction (heterogeneous ranks) and factor selection (FFA-/FedSA-LoRA) in the contract."""

from __future__ import annotations

import numpy as np
import pytest

from protos.adapter import LoraSpec, factor_of, layout_for_rank, parse_factors, select_factors, spec_for_rank
from strategies.lora_rank import adapter_rank, reduce_adapter, svd_reduce, truncate_adapter

PREFIXES = ("m.layers.0.q_proj", "m.layers.1.v_proj")


def adapter(rank: int, seed: int = 0, out: int = 12, inp: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = {}
    for prefix in PREFIXES:
        values[f"{prefix}.lora_A.weight"] = rng.normal(size=(rank, inp)).astype(np.float32)
        values[f"{prefix}.lora_B.weight"] = rng.normal(size=(out, rank)).astype(np.float32)
    return values


def product(values: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    return values[f"{prefix}.lora_B.weight"].astype(np.float64) @ values[f"{prefix}.lora_A.weight"]


def test_truncate_keeps_the_leading_rank() -> None:
    full = adapter(8)
    small = truncate_adapter(full, 4)
    assert adapter_rank(small) == 4
    for prefix in PREFIXES:
        assert np.array_equal(small[f"{prefix}.lora_A.weight"], full[f"{prefix}.lora_A.weight"][:4])
        assert np.array_equal(small[f"{prefix}.lora_B.weight"], full[f"{prefix}.lora_B.weight"][:, :4])


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_svd_reduce_is_the_best_rank_r_approximation(rank: int) -> None:
    full = adapter(8, seed=1)
    small = svd_reduce(full, rank)
    assert adapter_rank(small) == rank
    for prefix in PREFIXES:
        u, s, vt = np.linalg.svd(product(full, prefix))
        best = (u[:, :rank] * s[:rank]) @ vt[:rank]
        np.testing.assert_allclose(product(small, prefix), best, rtol=1e-4, atol=1e-4)
        # balanced factors: equal norms of B' and A'
        b, a = small[f"{prefix}.lora_B.weight"], small[f"{prefix}.lora_A.weight"]
        np.testing.assert_allclose(np.linalg.norm(b), np.linalg.norm(a), rtol=1e-4)


def test_reduce_adapter_rules() -> None:
    full = adapter(8)
    assert reduce_adapter(full, 8, "none") is full
    with pytest.raises(ValueError, match="heterogeneous ranks"):
        reduce_adapter(full, 4, "none")
    with pytest.raises(ValueError, match="exceeds"):
        reduce_adapter(full, 16, "truncate")
    assert adapter_rank(reduce_adapter(full, 2, "svd")) == 2


def test_factor_selection_and_parsing() -> None:
    full = adapter(4)
    only_b = select_factors(full, ("lora_B",))
    assert set(only_b) == {f"{p}.lora_B.weight" for p in PREFIXES}
    assert sum(v.nbytes for v in only_b.values()) < sum(v.nbytes for v in full.values())
    assert parse_factors("lora_B, lora_A") == ("lora_A", "lora_B")
    with pytest.raises(ValueError):
        parse_factors("lora_C")
    with pytest.raises(ValueError):
        factor_of("m.layers.0.q_proj.weight")


def test_rank_specs_keep_the_lora_scaling() -> None:
    spec = LoraSpec(rank=16, alpha=32.0)
    for rank in (4, 8, 16):
        own = spec_for_rank(spec, rank)
        assert own.alpha / own.rank == spec.alpha / spec.rank
    layout = {"x.lora_A.weight": (16, 10), "x.lora_B.weight": (12, 16)}
    assert layout_for_rank(layout, 4) == {"x.lora_A.weight": (4, 10), "x.lora_B.weight": (12, 4)}
