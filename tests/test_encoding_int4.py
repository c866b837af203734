"""q4 (protos/encodings/q4.py): 4-bit codes per block of 64 values, each block with a float16 scale.

The claims: every value decodes within half its block's scale; a LoRA tensor
takes at least 7 times fewer bytes than fp32; whatever a sender puts in the
bytes is decoded or refused with a named reason; ``update-encoding = "q4"``
selects it; and the coordinator averages exactly what the organizations' q4
bytes say.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, Message

from protos import codec
from protos.adapter import LoraSpec
from protos.encodings import ENCODINGS
from protos.encodings.q4 import BLOCK
from protos.errors import RejectReason, UpdateRejected
from protos.round_config import CONFIG_RECORD, RoundConfig
from protos.silotune.v1 import update_pb2 as pb
from server.job import Job
from server.job_config import JobConfig
from test_round_loop import ScriptedGrid, config
from codec_wire import blob_of, packed_bytes, repacked, set_blob, wires

Q4 = ENCODINGS.get("q4")
UPDATE = codec.Kind.Value("UPDATE")
SPEC = LoraSpec(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
#: SmolLM2-135M's q_proj and v_proj adapters at rank 8 (hidden 576, 3 key/value heads of 64)
LORA_LAYOUT = {"m.q_proj.lora_A.weight": (8, 576), "m.q_proj.lora_B.weight": (576, 8),
               "m.v_proj.lora_A.weight": (8, 576), "m.v_proj.lora_B.weight": (192, 8)}


def _send(values: dict[str, np.ndarray], encoding: int = pb.Q4):  # type: ignore[no-untyped-def]
    return codec.encode(values, kind=UPDATE, job_id="job", server_round=1, fingerprint="fp", lora=SPEC,
                        num_examples=5, encoding=encoding)


def _round_trip(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(decoded, each value's block scale) for one tensor sent as q4 through the codec."""
    content = _send({"t": values})
    wire = wires(content)["t"]
    blocks = -(-values.size // BLOCK)
    scales = wire[: 2 * blocks].view("<f2").astype(np.float64)
    _, decoded = codec.decode(content)
    return decoded["t"], np.repeat(scales, BLOCK)[: values.size].reshape(values.shape)


def _odd_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(14)
    outlier = (rng.normal(size=(7, 129)) * 1e-3).astype(np.float32)
    outlier[3, 100] = 1e3  # one block of 64 carries it; the others keep their own scales
    zeros_between = rng.normal(size=(5, 64)).astype(np.float32)
    zeros_between[1:3] = 0.0  # two whole blocks of zeros
    return {
        "one value": np.array([0.37], np.float32),
        "63 values": rng.normal(size=(63,)).astype(np.float32),
        "65 values": rng.normal(size=(5, 13)).astype(np.float32),
        "3x5x7": (rng.normal(size=(3, 5, 7)) * 1e-4).astype(np.float32),
        "lora A": (rng.normal(size=(8, 576)) * 0.02).astype(np.float32),
        "zero blocks": zeros_between,
        "all zeros": np.zeros((3, 50), np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "huge outlier": outlier,
        "tiny": np.array([1e-40, -3e-9, 2e-7, 0.0, -0.0, 6e-5, 1e-6], np.float32),
        "ties": np.array([0.5, 1.5, -2.5, 3.5, 7.0, -7.0, 0.0, 6.5, -6.5], np.float32),
    }


@pytest.mark.parametrize("name", sorted(_odd_tensors()))
def test_each_value_decodes_within_half_its_blocks_scale(name: str) -> None:
    values = _odd_tensors()[name]
    decoded, scale = _round_trip(values)
    assert decoded.dtype == np.float32 and decoded.shape == values.shape
    error = np.abs(decoded.astype(np.float64) - values.astype(np.float64))
    assert np.all(error <= scale * (0.5 + 2.0**-20)), float(np.max(error / np.maximum(scale, 1e-300)))
    # the scale is max|block| / 7 rounded up to a float16: one step above at most (2**-10 relative,
    # 2**-24 absolute among float16's subnormals); 0 for a block of zeros
    flat = np.concatenate([values.reshape(-1), np.zeros(-values.size % BLOCK, np.float32)]).reshape(-1, BLOCK)
    peak = np.abs(flat).max(axis=1).astype(np.float64) if flat.size else np.zeros(0)
    block_scale = scale.reshape(-1)[::BLOCK] if values.size else np.zeros(0)
    assert np.all(block_scale * 7 >= peak)
    assert np.all(block_scale <= peak / 7 * (1 + 2.0**-10) + 2.0**-24 * (peak > 0))
    assert np.all((block_scale == 0) == (peak == 0))
    # and within the bound the encoding declares for the whole tensor
    assert float(error.max(initial=0.0)) <= Q4.max_abs_error(values)


def test_zeros_stay_exact_and_an_outlier_costs_only_its_own_block() -> None:
    values = _odd_tensors()["huge outlier"]
    decoded, scale = _round_trip(values)
    flat_values, flat_decoded = values.reshape(-1), decoded.reshape(-1)
    outlier_block = int(np.argmax(np.abs(flat_values))) // BLOCK
    others = np.ones(flat_values.size, bool)
    others[outlier_block * BLOCK : (outlier_block + 1) * BLOCK] = False
    # a per-tensor scale would be 1e3 / 7 everywhere; here every other block keeps ~1e-3 / 7 resolution
    assert np.max(np.abs(flat_decoded - flat_values)[others]) < 1e-3
    assert flat_decoded[np.argmax(np.abs(flat_values))] == pytest.approx(1e3, rel=1e-3)

    zeros = _odd_tensors()["zero blocks"]
    decoded, scale = _round_trip(zeros)
    assert np.all(decoded[1:3] == 0.0) and np.all(scale[1:3] == 0.0)
    assert not np.signbit(_round_trip(np.array([-0.0, 0.0], np.float32))[0]).any()


def test_the_same_values_give_the_same_bytes() -> None:
    values = _odd_tensors()["lora A"]
    first, second = Q4.encode(values), Q4.encode(values.copy())
    assert first[0].tobytes() == second[0].tobytes() and first[1] == second[1] == 0.0


def test_a_lora_tensor_takes_at_least_seven_times_fewer_bytes_than_fp32() -> None:
    rng = np.random.default_rng(3)
    adapter = {name: (rng.normal(size=shape) * 0.01).astype(np.float32) for name, shape in LORA_LAYOUT.items()}
    q4_content, fp32_content = _send(adapter), _send(adapter, encoding=pb.FP32)
    q4, fp32 = wires(q4_content), wires(fp32_content)
    for name, values in adapter.items():
        wire = q4[name]
        assert wire.dtype == np.uint8 and wire.shape == Q4.wire_shape(values.shape)
        # 0.5 byte a value + 2 bytes a block of 64: 7.53x fewer than 4 bytes a value
        assert wire.nbytes == values.size // 2 + 2 * (values.size // BLOCK)
        assert fp32[name].nbytes >= 7 * wire.nbytes, name
    assert packed_bytes(fp32_content) >= 7 * packed_bytes(q4_content)  # .npy header and padding included


# ---- what a sender can put in the bytes ------------------------------------------------------

def _tampered(change) -> object:  # type: ignore[no-untyped-def]
    """A q4 reply of one (3, 43)-tensor (129 values: 3 blocks, an odd count) with its wire bytes changed."""
    values = np.random.default_rng(9).normal(size=(3, 43)).astype(np.float32)
    content = _send({"t": values})
    return repacked(content, {"t": change(np.array(wires(content)["t"]))})


def _reason(content) -> RejectReason:  # type: ignore[no-untyped-def]
    with pytest.raises(UpdateRejected) as info:
        codec.decode(content)
    return info.value.reason


def _scale_set(value: float):  # type: ignore[no-untyped-def]
    def change(wire: np.ndarray) -> np.ndarray:
        wire[2:4] = np.array([value], "<f2").view(np.uint8)  # the second block's scale
        return wire
    return change


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf"), -0.5, -0.0])
def test_a_scale_that_is_not_finite_or_is_negative_is_refused_as_non_finite(scale: float) -> None:
    assert _reason(_tampered(_scale_set(scale))) is RejectReason.NON_FINITE


def test_codes_the_encoder_never_writes_are_refused_as_malformed() -> None:
    def code_minus_8(wire: np.ndarray) -> np.ndarray:
        wire[6 + 10] &= 0xF0  # a low nibble of 0: q = -8
        return wire

    def padding_not_8(wire: np.ndarray) -> np.ndarray:
        wire[-1] = (wire[-1] & 0x0F) | 0x30  # the last byte: value 129's code (low), then padding (high)
        return wire

    def last_code_changed(wire: np.ndarray) -> np.ndarray:
        wire[-1] = (wire[-1] & 0xF0) | 0x1  # value 129 becomes -7 steps: a code the encoder may write
        return wire

    assert _reason(_tampered(code_minus_8)) is RejectReason.MALFORMED
    assert _reason(_tampered(padding_not_8)) is RejectReason.MALFORMED
    _, decoded = codec.decode(_tampered(last_code_changed))
    assert decoded["t"][-1, -1] < 0


def test_truncated_unpacked_or_retyped_payloads_are_refused_by_the_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _reason(_tampered(lambda w: w[:-1])) is RejectReason.TENSOR_SHAPE          # one byte short
    assert _reason(_tampered(lambda w: np.append(w, np.uint8(8)))) is RejectReason.TENSOR_SHAPE
    assert _reason(_tampered(lambda w: np.zeros((3, 43), np.uint8))) is RejectReason.TENSOR_SHAPE  # not packed
    content = _send({"t": np.ones((3, 43), np.float32)})  # the packed Array retyped
    assert _reason(set_blob(content, blob_of(content).view(np.int8))) is RejectReason.TENSOR_DTYPE

    monkeypatch.setattr(codec, "INLINE_LIMIT", 0)  # the blob in the Array, to cut its data short
    content = _send({"t": np.ones((3, 43), np.float32)})
    arrays = content.array_records[codec.TENSORS_RECORD]
    a = arrays[codec.PACKED_ARRAY]
    arrays[codec.PACKED_ARRAY] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data[:-7])  # cut short
    assert _reason(content) is RejectReason.MALFORMED


def test_non_finite_values_sent_as_q4_are_refused_as_non_finite() -> None:
    for bad in (np.nan, np.inf, 1e6):  # 1e6 / 7 is past float16's range: the scale is infinite
        values = np.ones((2, 40), np.float32)
        values[1, 3] = bad
        assert _reason(_send({"t": values})) is RejectReason.NON_FINITE
        assert Q4.max_abs_error(values) == np.inf


def test_any_corrupted_byte_decodes_or_is_refused_by_name() -> None:
    """Random corruption of scales and codes: decode returns float32 of the right shape, or
    raises UpdateRejected — never another exception the round's validator would not expect."""
    rng = np.random.default_rng(0)
    reasons = set()
    for _ in range(300):
        def flip(wire: np.ndarray) -> np.ndarray:
            where = rng.integers(0, wire.size, size=rng.integers(1, 4))
            wire[where] = rng.integers(0, 256, size=where.size, dtype=np.uint8)
            return wire
        try:
            _, decoded = codec.decode(_tampered(flip))
        except UpdateRejected as err:
            reasons.add(err.reason)
        else:
            assert decoded["t"].dtype == np.float32 and decoded["t"].shape == (3, 43)
            assert np.isfinite(decoded["t"]).all()
    assert reasons <= {RejectReason.NON_FINITE, RejectReason.MALFORMED} and reasons


# ---- chosen by the job, averaged by the coordinator ---------------------------------------

def test_update_encoding_q4_is_selected_from_a_run_config() -> None:
    cfg = JobConfig.from_run_config({"update-encoding": "q4"})
    assert cfg.update_encoding == "q4"
    assert codec.encoding_from_name(cfg.update_encoding) == pb.Q4 == Q4.wire_id
    assert "q4" in codec.encoding_names()
    assert ENCODINGS.get("Q4") is Q4 and Q4.__module__ == "protos.encodings.q4"


def _org_sending_q4(seed: int, sent: dict[int, dict[str, np.ndarray]]):  # type: ignore[no-untyped-def]
    """An organization that replies global + noise in the round config's encoding, keeping
    in ``sent`` what its bytes decode to (what the coordinator should average)."""
    rng = np.random.default_rng(seed)

    def handle(message: Message) -> Message:
        cfg = RoundConfig.from_record(message.content.config_records[CONFIG_RECORD])
        header, global_adapter = codec.decode(message.content)
        if message.metadata.message_type == "evaluate":
            from flwr.app import ConfigRecord, MetricRecord, RecordDict

            return Message(RecordDict({"metrics": MetricRecord({"num_examples": 4.0, "loss": 1.0, "accuracy": 0.5}),
                                       "organization": ConfigRecord({"name": f"org-{seed}"})}),
                           reply_to=message)
        assert {t.encoding for t in header.tensors} == {pb.FP32}  # the global adapter comes down as fp32
        update = {k: v + (rng.normal(size=v.shape) * 0.05).astype(np.float32) for k, v in global_adapter.items()}
        content = codec.encode(update, kind=UPDATE, job_id=cfg.job_id, server_round=cfg.server_round,
                               fingerprint=header.base_model_fingerprint, lora=cfg.lora, num_examples=10,
                               encoding=codec.encoding_from_name(cfg.update_encoding))
        reply_header, dequantized = codec.decode(content)
        assert {t.encoding for t in reply_header.tensors} == {pb.Q4}
        sent[seed] = {k: np.array(v) for k, v in dequantized.items()}
        sent[-seed] = update
        return Message(content, reply_to=message)

    return handle


def test_a_round_of_q4_updates_averages_the_dequantized_values(tmp_path: Path) -> None:
    sent: dict[int, dict[str, np.ndarray]] = {}
    grid = ScriptedGrid({1: _org_sending_q4(1, sent), 2: _org_sending_q4(2, sent)})
    final = Job(grid, config(tmp_path, update_encoding="q4")).run()
    summary = final.run_state["history"][-1]
    assert len(summary["accepted"]) == 2
    assert summary["rejected"] == []
    lossy = False
    for name, value in final.adapter.items():
        mean = ((sent[1][name].astype(np.float64) + sent[2][name].astype(np.float64)) / 2).astype(np.float32)
        np.testing.assert_allclose(value, mean, rtol=0, atol=1e-7)
        unquantized = (sent[-1][name].astype(np.float64) + sent[-2][name].astype(np.float64)) / 2
        lossy |= bool(np.max(np.abs(unquantized - mean)) > 1e-4)
    assert lossy  # the bytes were q4's, not fp32's
