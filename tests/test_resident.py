"""Where the resident model lives: the organization's GPU when it has one, named errors otherwise."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from clients.resident import DEVICE_VAR, choose_device  # noqa: E402


def test_default_is_the_first_visible_gpu_else_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEVICE_VAR, raising=False)
    assert choose_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_the_cpu_can_be_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_VAR, "cpu")
    assert choose_device() == torch.device("cpu")


@pytest.mark.parametrize("value,message", [("gpu0", "is not a device"), ("meta", "only cpu and cuda")])
def test_a_bad_device_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    monkeypatch.setenv(DEVICE_VAR, value)
    with pytest.raises(ValueError, match=message):
        choose_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_VAR, "cuda")
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        choose_device()


def test_each_rank_keeps_its_model_so_heterogeneous_ranks_do_not_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    """A simulation actor serving organizations of ranks 4/8/16 in turn loads each once."""
    from clients import resident
    from protos.adapter import LoraSpec

    monkeypatch.setattr(resident, "_RESIDENT", type(resident._RESIDENT)())
    specs = [LoraSpec(rank=r, alpha=2.0 * r) for r in (4, 8, 16)]
    before = resident.LOAD_COUNT
    for spec in specs + specs[::-1] + specs:
        model = resident.get_resident("tiny-llama", spec)
        assert model.lora == spec and spec.rank in next(iter(model.layout.values()))
    assert resident.LOAD_COUNT - before == 3

    monkeypatch.setattr(resident, "MAX_RESIDENT_SPECS", 1)  # the old behaviour: one spec per process
    resident._RESIDENT.clear()
    before = resident.LOAD_COUNT
    for spec in specs + specs:
        resident.get_resident("tiny-llama", spec)
    assert resident.LOAD_COUNT - before == 6 and len(resident._RESIDENT) == 1
