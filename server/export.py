"""Export the specialist: a plain PEFT adapter folder plus its provenance.

The result loads with ``PeftModel.from_pretrained(base, out_dir)`` and needs
nothing from silotune. It is written into a sibling ``.tmp-export-*`` folder
and renamed into place, so ``out_dir`` is either absent/old or complete.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import secrets
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from protos.adapter import adapter_num_parameters
from server.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Checkpoint,
    fsync_dir,
    json_bytes,
    serialize_tensors,
    write_synced,
)

log = logging.getLogger("silotune.export")

PROVENANCE = "provenance.json"
README = "README.md"


def silotune_version() -> str:
    try:
        return metadata.version("silotune")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0+unknown"


def _jsonable(obj: Any) -> Any:
    """json default= for provenance: caller metadata often holds numpy scalars or paths."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, _dt.datetime, _dt.date)):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"provenance value of type {type(obj).__name__} is not JSON-able")


def _organizations(provenance: dict) -> int | None:
    for key in ("num_organizations", "organizations"):
        value = provenance.get(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            return value
        if isinstance(value, (list, tuple, dict, set)):
            return len(value)
    return None


def _model_card(ckpt: Checkpoint, prov: dict, out_dir: Path) -> str:
    lora = ckpt.lora
    rounds = f"{ckpt.round}" if ckpt.round else "0 (the initial, untrained adapter)"
    rows = [
        ("base model", f"`{ckpt.base_model}`"),
        ("federated rounds", rounds),
    ]
    orgs = _organizations(prov)
    if orgs is not None:
        rows.append(("organizations", str(orgs)))
    rows += [
        ("strategy", str(prov.get("strategy", "not recorded"))),
        ("secure aggregation", {True: "yes: the coordinator saw only sums of updates", False: "no"}.get(
            prov.get("secure_aggregation"), "not recorded")),
        ("LoRA", f"r={lora.rank}, alpha={lora.alpha:g}, targets={', '.join(lora.target_modules)}"),
        ("adapter parameters", f"{adapter_num_parameters(ckpt.adapter):,}"),
        ("exported", prov["exported_at"]),
        ("silotune", prov["silotune_version"]),
        ("adapter sha256", f"`{prov['adapter_sha256']}`"),
    ]
    if "job_id" in prov:
        rows.insert(0, ("job", f"`{prov['job_id']}`"))
    dp = prov.get("differential_privacy")
    if isinstance(dp, dict):  # server/privacy.py: what a differentially private job spent
        rows.append(("differential privacy",
                     f"(ε = {dp.get('epsilon', float('nan')):.3g}, δ = {dp.get('delta', float('nan')):g}) per organization, "
                     f"noise at the {dp.get('noise_placement')}"
                     + (" (added once to the secure-aggregation sum)" if dp.get("secure_aggregation") else "")
                     + f", clipped by {dp.get('clipped_by', 'not recorded')}"
                     + f", z = {dp.get('noise_multiplier')}, C = {dp.get('clip_norm')}"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    # JSON strings are valid YAML scalars: safe quoting for any model path.
    front = f'---\nlibrary_name: peft\nbase_model: {json.dumps(ckpt.base_model)}\ntags:\n- silotune\n- lora\n- federated-learning\n---\n'
    return f"""{front}
# {out_dir.name}: a silotune specialist

A LoRA adapter for `{ckpt.base_model}`, trained by federated fine-tuning with
silotune: each organization trained on data that never left its silo, and
only adapter updates were combined.

| | |
|---|---|
{table}

## Load it

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel

base = AutoModelForCausalLM.from_pretrained({ckpt.base_model!r})
tokenizer = AutoTokenizer.from_pretrained({ckpt.base_model!r})
model = PeftModel.from_pretrained(base, "path/to/{out_dir.name}")
model = model.merge_and_unload()  # optional: a plain model, no adapter overhead
```

`{PROVENANCE}` holds the full record of how this adapter was made.
"""


def export_specialist(
    checkpoint: Checkpoint,
    out_dir: str | Path,
    provenance: dict,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the checkpoint's adapter as a PEFT folder with provenance and a model card.

    ``provenance`` is the caller's record (job id, organizations, strategy,
    metrics...); the facts taken from the checkpoint (round, base_model, lora,
    exported_at, silotune_version, adapter_sha256) are added and win over
    same-named caller keys. Raises FileExistsError if ``out_dir`` exists and is
    not empty, unless ``overwrite=True``.
    """
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise FileExistsError(f"{out} exists and is not a directory; refusing to replace it")
        if any(out.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{out} already exists and is not empty; pass overwrite=True to replace it"
            )

    weights = serialize_tensors(checkpoint.adapter, "adapter")
    lora = checkpoint.lora
    facts = {
        "round": checkpoint.round,
        "base_model": checkpoint.base_model,
        "lora": {
            "rank": lora.rank,
            "alpha": lora.alpha,
            "target_modules": list(lora.target_modules),
            "dropout": lora.dropout,
        },
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "silotune_version": silotune_version(),
        "adapter_sha256": hashlib.sha256(weights).hexdigest(),
    }
    prov = dict(provenance)
    for key, value in facts.items():
        if key in prov and prov[key] != value:
            log.warning("provenance[%r]=%r replaced by the checkpoint's %r", key, prov[key], value)
    prov.update(facts)
    try:
        prov_bytes = (json.dumps(prov, indent=2, ensure_ascii=False, default=_jsonable) + "\n").encode()
    except ValueError as e:  # circular reference
        raise TypeError(f"provenance is not JSON-able: {e}") from e
    files = {
        ADAPTER_CONFIG: json_bytes(lora.peft_config_dict(checkpoint.base_model)),
        ADAPTER_WEIGHTS: weights,
        PROVENANCE: prov_bytes,
        README: _model_card(checkpoint, prov, out).encode(),
    }

    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-export-{out.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for name, data in files.items():
            write_synced(tmp, name, data)
        fsync_dir(tmp)
        if out.exists() and any(out.iterdir()):
            # rename() cannot replace a non-empty dir: set the old one aside first.
            aside = parent / f".tmp-replaced-{out.name}-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(out, aside)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(aside, out)
                raise
            fsync_dir(parent)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, out)  # POSIX rename replaces an empty directory atomically
            fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported round %d of %s to %s", checkpoint.round, checkpoint.base_model, out)
    return out
