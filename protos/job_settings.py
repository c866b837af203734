"""Every setting of a job, defined once, with its default and its help.

``JobSettings`` is the one place a setting is declared (as PEFT's
``LoraConfig`` is for LoRA options). Everything else is derived from it:

* the coordinator's job config (server/job_config.py) subclasses it and adds
  the checks that need the strategies;
* the round config an organization receives (protos/round_config.py) is the
  projection of the fields whose scope is ``ROUND``, plus what the strategy
  asks of the organizations;
* the simulation settings (``SIMULATION`` scope) travel only to the virtual
  organizations of Flower's Simulation Engine, never to a deployed agent;
* ``[tool.flwr.app.config]`` in pyproject.toml is rendered from it
  (``render_run_config``; a test fails when the file is stale).

Names are the run-config keys with ``_`` for ``-`` (``lora_r`` ⇄ ``lora-r``),
in every place, on both sides.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Mapping

#: who gets a setting: the coordinator only, every organization, or only the
#: virtual organizations of a simulation
JOB, ROUND, SIMULATION = "job", "round", "simulation"


class SettingsError(ValueError):
    """A run-config value that cannot be used, with the key named."""


def setting(default: Any, help: str, scope: str = JOB) -> Any:  # noqa: A002 (PEFT's name for it)
    return field(default=default, metadata={"help": help, "scope": scope})


@dataclass(frozen=True)
class JobSettings:
    # ---- the job -----------------------------------------------------------
    job_id: str = setting("silotune-demo", "name of the job; every message header carries it", ROUND)
    model: str = setting("tiny-llama", "base model: a built-in name (smollm2-135m, tiny-llama), a local folder "
                         "or a Hugging Face id", ROUND)
    num_rounds: int = setting(2, "federated rounds to run")
    run_dir: str = setting("runs/silotune", "where checkpoints, report.json and the specialist are written")
    tensorboard_dir: str = setting("", "also write the round events as TensorBoard scalars to this folder "
                                   "(empty: off)")
    mlflow_dir: str = setting("", "also log the round events to an MLflow SQLite store (mlflow.db) in this folder "
                              "(empty: off)")
    seed: int = setting(0, "seed of sampling, adapter initialisation, data splits and local training", ROUND)
    init_adapter: str = setting("", "start from this PEFT adapter folder instead of a fresh adapter (continued "
                                "training; the jobs service fills it from a registered specialist)")
    dataset: str = setting("", "the named dataset every organization trains on (agent start --data NAME=FILE); "
                           "empty: the agent's only one", ROUND)
    # ---- organizations and rounds -------------------------------------------
    min_nodes: int = setting(2, "organizations that must be online before a round starts")
    node_wait_timeout: float = setting(120.0, "seconds to wait for min-nodes organizations, then stop with an error")
    fraction_train: float = setting(1.0, "share of online organizations sampled for each round")
    fraction_evaluate: float = setting(1.0, "share of online organizations evaluated after each round "
                                       "(large fleets: a sample)")
    min_replies: int = setting(0, "quorum of accepted updates per round (0: min-nodes)")
    round_timeout: float = setting(600.0, "seconds a round waits for replies")
    round_retries: int = setting(0, "a round below quorum is retried this often with a fresh sample, then the job stops")
    poll_interval: float = setting(0.2, "seconds between polls for replies")
    # ---- aggregation -------------------------------------------------------
    strategy: str = setting("fedavg", "aggregation strategy (strategies/; e.g. fedavg, fedprox, krum, ffa-lora, dp-fedavg)")
    strategy_params: str = setting("", "the strategy's parameters, 'key=value,key=value' (e.g. 'mu=0.01' for fedprox)")
    norm_bound: float = setting(0.0, "updates whose L2 distance from the global adapter exceeds this are refused "
                                "(0: no bound)")
    max_update_bytes: int = setting(0, "replies above this many bytes are refused before decoding "
                                    "(0: twice the fp32 size of the update plus 64 KiB)")
    max_weight: int = setting(10000, "an update's weight in the aggregate is its example count, at most this "
                              "(plain rounds; under secure aggregation secagg-max-weight applies)")
    comm_budget_mb: float = setting(0.0, "stop before a round that would bring the bytes the job has moved "
                                    "(instructions down + replies up, evaluations included) above this many MB "
                                    "(10^6 bytes); the last round's result is the specialist (0: no budget)")
    # ---- the adapter and local training ------------------------------------
    lora_r: int = setting(8, "LoRA rank of the global adapter (PEFT's r)", ROUND)
    lora_alpha: float = setting(16.0, "LoRA alpha (PEFT's lora_alpha)", ROUND)
    lora_targets: str = setting("q_proj,v_proj", "comma-separated module names LoRA adapts (PEFT's target_modules)",
                                ROUND)
    lora_dropout: float = setting(0.0, "LoRA dropout (PEFT's lora_dropout)", ROUND)
    local_steps: int = setting(4, "optimizer steps per organization per round", ROUND)
    batch_size: int = setting(4, "examples per optimizer step", ROUND)
    learning_rate: float = setting(5e-4, "AdamW learning rate of local training", ROUND)
    max_length: int = setting(160, "tokens per example; longer prompts are cut in the middle", ROUND)
    test_fraction: float = setting(0.2, "share of each organization's records held out for evaluation", ROUND)
    eval_max_examples: int = setting(64, "held-out examples each organization scores per evaluation", ROUND)
    update_encoding: str = setting("fp32", "how the organizations' updates travel up (protos/encodings/: fp32, "
                                   "fp16, int8, q4: 4-bit blocks, 7.5x fewer bytes than fp32)", ROUND)
    global_encoding: str = setting("fp32", "how the global adapter travels down each round (the same encodings); "
                                   "a lossy one keeps the coordinator's global on its grid, so organizations "
                                   "train and evaluate exactly the adapter it holds and exports")
    global_delta: bool = setting(False, "send the global as its difference from the global an organization proved "
                                 "it holds, in global-encoding (the same global again: no tensors); the global "
                                 "then moves by the quantized difference instead of sitting on the grid")
    local_baseline: bool = setting(False, "each organization also trains a local-only adapter with the same local "
                                   "budget and reports its held-out score next to the federated one", ROUND)
    # ---- the task (protos/task_spec.py; every organization renders the same prompts from it) ----
    task: str = setting("auto", "classification, instruction or chat (auto: each organization's file decides; a "
                        "classification job must still declare task-labels unless it is a simulation)", ROUND)
    task_labels: str = setting("", "classification: the label set, comma-separated or a JSON array; rows with "
                               "another label follow unknown-labels", ROUND)
    unknown_labels: str = setting("error", "a row whose label is not in task-labels: error (the organization "
                                  "refuses the job, naming the rows) or skip (dropped and counted)", ROUND)
    prompt_template: str = setting("", "the user message: classification uses {labels} and {text}, instruction "
                                   "{prompt} (empty: the built-in one; chat rows are used as they are)", ROUND)
    system_prompt: str = setting("", "a system message before every example (a conversation's own system turn "
                                 "wins)", ROUND)
    metric: str = setting("auto", "the headline metric: accuracy, macro-f1, exact-match or perplexity (auto: "
                          "accuracy for classification, perplexity otherwise)", ROUND)
    # ---- privacy -----------------------------------------------------------
    dp_epsilon_max: float = setting(0.0, "differentially private strategies: stop before a round that would spend "
                                    "more than this epsilon (0: no budget; epsilon is still tracked and reported)")
    dp_delta: float = setting(1e-5, "the delta at which epsilon is reported and the budget is checked")
    secure_aggregation: bool = setting(False, "organizations mask their deltas; the coordinator learns only their "
                                       "weighted sum (linear strategies and dp-fedavg)")
    secagg_clip: float = setting(0.05, "secure aggregation: per-coordinate bound on a delta "
                                 "(dp-fedavg: each delta is clipped to its clip_norm instead)")
    secagg_max_weight: int = setting(10000, "secure aggregation: example counts above this count as this")
    secagg_threshold: int = setting(0, "secure aggregation: Shamir threshold t (0: floor(N/2)+1); N - t "
                                    "organizations may drop after masking")
    # ---- simulation only (virtual organizations; a deployed agent never receives these) ----
    sim_dataset: str = setting("bbc-news", "corpus the virtual organizations' silos are cut from "
                               "(bbc-news, construction-faq)", SIMULATION)
    sim_skew: float = setting(0.8, "label skew of the virtual organizations' silos (0: iid)", SIMULATION)
    sim_max_records: int = setting(120, "records per virtual organization (0: no cap)", SIMULATION)
    sim_ranks: str = setting("", "heterogeneous LoRA ranks, assigned round-robin to virtual organizations "
                             "(e.g. '4,8,16'; hetlora, flexlora)", SIMULATION)
    sim_data: str = setting("", "your own data instead of sim-dataset: a silo file (split by sim-partitioner) or a "
                            "folder of one silo file per organization; every Ray node must see the path", SIMULATION)
    sim_partitioner: str = setting("iid", "how sim-data is split: iid, dirichlet:ALPHA (label skew), by:COLUMN "
                                   "(one organization per value)", SIMULATION)
    sim_attack: str = setting("", "experiments only: 'KIND:FRACTION' makes that share of the virtual organizations "
                              "poisoning attackers (sign-flip, scale10, flip10; clients/attacks.py)", SIMULATION)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]):  # type: ignore[no-untyped-def]
        """Settings from Flower run-config keys (dashed); an unknown key or a
        value of the wrong type is a SettingsError naming the key."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for raw_key, value in run_config.items():
            name = str(raw_key).replace("-", "_")
            if name not in known:
                valid = ", ".join(sorted(run_config_key(k) for k in known))
                raise SettingsError(f"unknown run-config key {raw_key!r}; valid keys: {valid}")
            values[name] = _coerce(str(raw_key), value, type(known[name].default))
        return cls(**values)

    def scoped(self, scope: str) -> dict[str, Any]:
        """The values of the settings of one scope, by field name."""
        return {f.name: getattr(self, f.name) for f in settings_of(scope)}


def settings_of(scope: str) -> list[Field]:
    return [f for f in fields(JobSettings) if f.metadata["scope"] == scope]


def run_config_key(name: str) -> str:
    return name.replace("_", "-")


def render_run_config() -> str:
    """``[tool.flwr.app.config]`` for pyproject.toml: every setting with its
    default, its help as a comment (``flwr run`` refuses an override for a key
    the file does not declare, so all of them are there)."""
    lines = ["[tool.flwr.app.config]"]
    for f in fields(JobSettings):
        lines.append(f"# {f.metadata['help']}" + (" [simulation only]" if f.metadata["scope"] == SIMULATION else ""))
        lines.append(f"{run_config_key(f.name)} = {_toml_value(f.default)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _boolean(value: Any) -> bool:
    # bool("false") is True: a string must say which
    if isinstance(value, str):
        if value.strip().lower() in ("true", "1", "yes"):
            return True
        if value.strip().lower() in ("false", "0", "no"):
            return False
        raise ValueError("not true or false")
    if value in (0, 1):  # True, False, 0, 1
        return bool(value)
    raise ValueError("not true or false")


def _coerce(key: str, value: Any, target: type) -> Any:
    try:
        if target is bool:
            return _boolean(value)
        if target is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not a whole number")
            return int(value)
        if target is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError) as err:
        raise SettingsError(f"{key}={value!r}: expected {target.__name__} ({err})") from None


assert all(f.default is not MISSING for f in fields(JobSettings)), "every setting has a default"
