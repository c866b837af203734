"""`silotune eval | generate`: run a base model or a specialist where the data is (an organization's side).

The specialist is an exported PEFT adapter folder (`silotune export`); the
data never leaves this machine.
"""

from __future__ import annotations

import argparse
import json

from runtime.console import console


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("eval", help="score a base model, or base + adapter, on a silo file")
    p.add_argument("--data", required=True, help="silo file (.jsonl, .json, .csv, .parquet, .arrow, or a Hugging Face datasets folder)")
    p.add_argument("--model", help="base model (default: the adapter's base, else smollm2-135m)")
    p.add_argument("--adapter", help="PEFT adapter folder (omit to score the base model)")
    p.add_argument("--split", choices=("test", "all"), default="test",
                   help="the held-out split made as in training, or every row")
    p.add_argument("--max-examples", type=int, default=200)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--seed", type=int, default=0, help="split seed used by the job")
    p.set_defaults(handler=evaluate)

    p = commands.add_parser("generate", help="answer a prompt with a specialist")
    p.add_argument("--prompt", required=True)
    p.add_argument("--model", help="base model (default: the adapter's base, else smollm2-135m)")
    p.add_argument("--adapter", help="PEFT adapter folder")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(handler=generate)


def _resident(model: str | None, adapter_dir: str | None):  # type: ignore[no-untyped-def]
    from clients.resident import get_resident
    from protos.adapter import LoraSpec, read_adapter_folder

    if adapter_dir:
        spec, base_name, tensors = read_adapter_folder(adapter_dir)
        resident = get_resident(model or _known_base(base_name), spec)
        resident.load_adapter(tensors)
        return resident
    return get_resident(model or "smollm2-135m", LoraSpec())


def _known_base(name: str) -> str:
    """Our exported adapters record the builtin's Hub name; map it back to the builtin."""
    from runtime.base_model import BUILTIN_MODELS

    if name in BUILTIN_MODELS:
        return name
    if name.endswith("SmolLM2-135M-Instruct"):
        return "smollm2-135m"
    return name or "smollm2-135m"


def evaluate(args: argparse.Namespace) -> int:
    from clients.evaluation import evaluate_examples
    from clients.formatting import encode_example
    from clients.silo import load_silo, split_silo

    silo = load_silo(args.data)
    rows = split_silo(silo, seed=args.seed)[1] if args.split == "test" else silo
    examples = rows.examples[: args.max_examples]
    resident = _resident(args.model, args.adapter)
    encoded = [encode_example(resident.tokenizer, e.prompt, e.answer, args.max_length) for e in examples]
    labels = [e.label for e in examples] if silo.task == "classification" else None
    metrics = evaluate_examples(resident, encoded, labels, silo.labels, use_adapter=args.adapter is not None)
    console.print_json(json.dumps({"model": resident.name, "adapter": args.adapter, "data": args.data,
                                   "split": args.split, **metrics}))
    return 0


def generate(args: argparse.Namespace) -> int:
    import torch

    from clients.formatting import render_prompt

    resident = _resident(args.model, args.adapter)
    tokenizer = resident.tokenizer
    inputs = tokenizer(render_prompt(tokenizer, args.prompt), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = resident.model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return 0
