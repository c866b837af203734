"""Export of the specialist: a PEFT folder that loads, changes the model, and says where it came from."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from protos.adapter import LoraSpec, adapter_layout, init_adapter
from server.checkpoint import Checkpoint, CheckpointStore
from server.export import export_specialist

SPEC = LoraSpec(rank=4, alpha=8)
BASE = "tiny-llama"
PROVENANCE = {
    "job_id": "bbc-topics-7",
    "organizations": ["org-a", "org-b", "org-c"],
    "strategy": "fedavg",
    "final_metrics": {"accuracy": 0.59},
}


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )


def tiny_model():
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config()).eval()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # peft would look "tiny-llama" up on the Hub


@pytest.fixture
def checkpoint(tmp_path) -> Checkpoint:
    ad = init_adapter(adapter_layout(tiny_config(), SPEC), seed=1)
    rng = np.random.default_rng(3)
    for name, arr in ad.items():
        if ".lora_B." in name:  # non-zero B: the adapter changes the model
            ad[name] = rng.normal(0.0, 0.2, size=arr.shape).astype(np.float32)
    store = CheckpointStore(tmp_path / "ckpt")
    store.save(4, ad, SPEC, BASE, {"round": 4}, {"m": np.zeros(3, np.float32)})
    return store.latest()  # as the coordinator would: read back from disk


def test_export_loads_with_peft_and_changes_the_model(tmp_path, checkpoint):
    import torch
    from peft import PeftModel, get_peft_model_state_dict

    out = export_specialist(checkpoint, tmp_path / "specialist", PROVENANCE)
    assert out == tmp_path / "specialist"

    model = tiny_model()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = model(ids).logits.clone()

    peft_model = PeftModel.from_pretrained(model, out).eval()
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    assert sorted(state) == sorted(checkpoint.adapter)
    for name, arr in checkpoint.adapter.items():
        got = state[name].detach().cpu().numpy()
        assert got.dtype == arr.dtype and np.array_equal(got, arr), name

    with torch.no_grad():
        adapted = peft_model(ids).logits
        with peft_model.disable_adapter():
            without = peft_model(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-4)  # the adapter is applied
    assert torch.equal(without, base_logits)  # and it is the only difference


def test_exported_files_match_the_checkpoint(tmp_path, checkpoint):
    out = export_specialist(checkpoint, tmp_path / "specialist", PROVENANCE)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "provenance.json",
    ]
    # Same serializer, same tensors: the file is byte-identical to the checkpoint's,
    # so provenance's adapter_sha256 is the one in the checkpoint's manifest.
    weights = "adapter_model.safetensors"
    assert (out / weights).read_bytes() == (checkpoint.path / weights).read_bytes()
    manifest = json.loads((checkpoint.path / "MANIFEST.json").read_text())
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["adapter_sha256"] == manifest["files"][weights]["sha256"]
    # Equal as JSON (lora_alpha may be 8 in one and 8.0 in the other).
    config = json.loads((out / "adapter_config.json").read_text())
    assert config == json.loads((checkpoint.path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE and config["r"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_provenance_and_model_card(tmp_path, checkpoint):
    out = export_specialist(checkpoint, tmp_path / "specialist", PROVENANCE)
    prov = json.loads((out / "provenance.json").read_text())
    for key, value in PROVENANCE.items():  # the caller's record is kept
        assert prov[key] == value
    assert prov["round"] == 4
    assert prov["base_model"] == BASE
    assert prov["lora"] == {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0}
    assert dt.datetime.fromisoformat(prov["exported_at"]).tzinfo is not None
    assert isinstance(prov["silotune_version"], str) and prov["silotune_version"]
    assert prov["adapter_sha256"] == hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()

    card = (out / "README.md").read_text()
    assert BASE in card
    assert "PeftModel.from_pretrained" in card
    assert "| organizations | 3 |" in card
    assert "| federated rounds | 4 |" in card
    assert "fedavg" in card
    assert "library_name: peft" in card


def test_caller_cannot_override_checkpoint_facts(tmp_path, checkpoint):
    out = export_specialist(checkpoint, tmp_path / "s", {"round": 99, "base_model": "other"})
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["round"] == 4 and prov["base_model"] == BASE


def test_refuses_to_overwrite_a_non_empty_dir(tmp_path, checkpoint):
    out = tmp_path / "specialist"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_specialist(checkpoint, out, PROVENANCE)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "specialist"]  # no leftovers

    export_specialist(checkpoint, out, PROVENANCE, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "specialist"]


def test_empty_existing_dir_is_fine_and_a_file_is_refused(tmp_path, checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_specialist(checkpoint, empty, {}) / "adapter_config.json").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError):
        export_specialist(checkpoint, a_file, {}, overwrite=True)
    assert a_file.read_text() == "x"


def test_provenance_with_numpy_values_is_written(tmp_path, checkpoint):
    prov = {"final_metrics": {"loss": np.float32(0.5), "n": np.int64(3)}, "data": Path("/silo/x")}
    out = export_specialist(checkpoint, tmp_path / "s", prov)
    got = json.loads((out / "provenance.json").read_text())
    assert got["final_metrics"] == {"loss": 0.5, "n": 3} and got["data"] == "/silo/x"


def test_adapter_config_names_what_a_hugging_face_user_loads(tmp_path, checkpoint, monkeypatch):
    from server.export import base_model_name_or_path

    assert base_model_name_or_path("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_name_or_path("tiny-llama") == "tiny-llama"  # no Hub id: the card says so
    assert base_model_name_or_path("org/some-model") == "org/some-model"
    (tmp_path / "my-base").mkdir()
    monkeypatch.chdir(tmp_path)
    assert base_model_name_or_path("my-base") == str((tmp_path / "my-base").resolve())  # a local folder: its path
    prov = json.loads((export_specialist(checkpoint, tmp_path / "s", {}) / "provenance.json").read_text())
    assert prov["base_model"] == BASE and prov["base_model_name_or_path"] == BASE
