"""The coordinator's job configuration, read from a Flower run config.

Keys are the `[tool.flwr.app.config]` keys of pyproject.toml (dashed), so
``flwr run . -c 'num-rounds=3'`` and scenario files use the same names. Every
key is validated here with a message naming it; an unknown key is an error,
because a misspelt ``num-round`` silently ignored would waste a day of GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from protos.adapter import LoraSpec
from protos.round_config import RoundConfig


#: simulated attacks (clients/attacks.py; a test checks both lists agree)
SIM_ATTACKS = ("sign-flip", "scale10", "flip10")


class JobConfigError(ValueError):
    """A run-config value that cannot be used, with the key named."""


@dataclass(frozen=True)
class JobConfig:
    job_id: str = "silotune-demo"
    model: str = "tiny-llama"
    num_rounds: int = 2
    min_nodes: int = 2               # wait for this many organizations online...
    node_wait_timeout: float = 120.0  # ...at most this long, then stop with a clear error
    fraction_train: float = 1.0      # share of online organizations sampled per round
    fraction_evaluate: float = 1.0   # share evaluated after each round (large fleets: a sample)
    min_replies: int = 0             # quorum of accepted updates (0: same as min_nodes)
    round_timeout: float = 600.0     # deadline for replies, per round
    round_retries: int = 0           # a round below quorum is retried this often (fresh sample), then stops
    poll_interval: float = 0.2
    strategy: str = "fedavg"
    strategy_params: str = ""        # "key=value,key=value", e.g. "mu=0.01" for fedprox
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,v_proj"
    lora_dropout: float = 0.0
    local_steps: int = 4
    batch_size: int = 4
    learning_rate: float = 5e-4
    max_length: int = 160
    test_fraction: float = 0.2
    eval_max_examples: int = 64
    update_encoding: str = "fp32"
    norm_bound: float = 0.0          # 0: no bound on the update norm
    dp_epsilon_max: float = 0.0      # DP strategies: stop before a round that would spend more ε (0: no budget)
    dp_delta: float = 1e-5           # the δ at which ε is reported and the budget is checked
    max_update_bytes: int = 0        # a reply above this is refused before decoding (0: 2x the fp32 update + 64 KiB)
    secure_aggregation: bool = False  # organizations mask their updates; the coordinator learns only the sum
    secagg_clip: float = 0.05        # secure aggregation: per-coordinate bound on a delta (dp-fedavg: clip_norm)
    secagg_max_weight: int = 10000   # secure aggregation: example counts above this count as this
    secagg_threshold: int = 0        # secure aggregation: shares to unmask (0: floor(N/2)+1); N - t may drop
    seed: int = 0
    run_dir: str = "runs/silotune"
    sim_dataset: str = "bbc-news"
    sim_skew: float = 0.8
    sim_max_records: int = 120
    sim_ranks: str = ""              # heterogeneous ranks for virtual organizations, e.g. "4,8,16"
    sim_attack: str = ""             # EXPERIMENTS ONLY: "sign-flip:0.2" makes 20% of virtual organizations attackers

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "JobConfig":
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for raw_key, value in run_config.items():
            key = raw_key.replace("-", "_")
            if key not in known:
                valid = ", ".join(sorted(k.replace("_", "-") for k in known))
                raise JobConfigError(f"unknown run-config key {raw_key!r}; valid keys: {valid}")
            values[key] = _coerce(raw_key, value, type(known[key].default))
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        def need(condition: bool, key: str, why: str) -> None:
            if not condition:
                raise JobConfigError(f"{key}={getattr(self, key.replace('-', '_'))!r}: {why}")

        need(self.num_rounds >= 1, "num-rounds", "must be >= 1")
        need(self.min_nodes >= 1, "min-nodes", "must be >= 1")
        need(0.0 < self.fraction_train <= 1.0, "fraction-train", "must be in (0, 1]")
        need(0.0 < self.fraction_evaluate <= 1.0, "fraction-evaluate", "must be in (0, 1]")
        need(self.min_replies >= 0, "min-replies", "must be >= 0")
        need(self.round_timeout > 0, "round-timeout", "must be > 0 seconds")
        need(self.round_retries >= 0, "round-retries", "must be >= 0")
        need(self.node_wait_timeout > 0, "node-wait-timeout", "must be > 0 seconds")
        need(self.local_steps >= 1, "local-steps", "must be >= 1")
        need(self.batch_size >= 1, "batch-size", "must be >= 1")
        need(self.learning_rate > 0, "learning-rate", "must be > 0")
        need(self.max_length >= 16, "max-length", "must be >= 16 tokens")
        need(0.0 < self.test_fraction < 1.0, "test-fraction", "must be in (0, 1)")
        need(self.update_encoding in ("fp32", "fp16", "int8"), "update-encoding", "one of fp32, fp16, int8")
        need(self.norm_bound >= 0, "norm-bound", "must be >= 0")
        need(self.max_update_bytes >= 0, "max-update-bytes", "must be >= 0 (0: derived from the adapter size)")
        need(self.dp_epsilon_max >= 0, "dp-epsilon-max", "must be >= 0 (0: no budget)")
        need(0.0 < self.dp_delta < 1.0, "dp-delta", "must be in (0, 1)")
        need(bool(self.job_id.strip()), "job-id", "must not be empty")
        try:
            self.lora
        except ValueError as err:
            raise JobConfigError(f"lora settings: {err}") from None
        strategy = self.build_strategy()
        self._validate_secure_aggregation(strategy, need)
        from strategies.dp_fedavg import PrivateStrategy

        need(self.dp_epsilon_max == 0 or isinstance(strategy, PrivateStrategy), "dp-epsilon-max",
             f"a privacy budget needs a differentially private strategy (dp-fedavg), not {self.strategy!r}")
        if self.sim_ranks:
            try:
                ranks = [int(r) for r in self.sim_ranks.split(",") if r.strip()]
            except ValueError:
                raise JobConfigError(f"sim-ranks={self.sim_ranks!r}: expected comma-separated integers") from None
            need(bool(ranks) and all(1 <= r <= self.lora_r for r in ranks), "sim-ranks",
                 f"each rank must be in [1, lora-r={self.lora_r}]")
            need(strategy.supports_heterogeneous_ranks or set(ranks) == {self.lora_r}, "sim-ranks",
                 f"strategy {self.strategy!r} needs one rank for all; use hetlora or flexlora")
        if self.sim_attack:
            kind, _, fraction = self.sim_attack.partition(":")
            try:
                share = float(fraction)
            except ValueError:
                share = -1.0
            need(kind in SIM_ATTACKS and 0.0 < share < 1.0, "sim-attack",
                 f"expected KIND:FRACTION with KIND one of {', '.join(SIM_ATTACKS)} and 0 < FRACTION < 1, "
                 "e.g. 'sign-flip:0.2' (simulation experiments only; see clients/attacks.py)")

    def _validate_secure_aggregation(self, strategy: Any, need: Any) -> None:
        need(self.secagg_clip > 0, "secagg-clip", "must be > 0")
        need(self.secagg_max_weight >= 1, "secagg-max-weight", "must be >= 1")
        need(self.secagg_threshold >= 0, "secagg-threshold", "must be >= 0 (0: floor(N/2)+1)")
        if not self.secure_aggregation:
            return
        from strategies.base import AggregationError

        try:
            strategy.secure_input()   # linear strategies, and dp-fedavg with its noise on the sum
        except AggregationError as refusal:
            need(False, "secure-aggregation", str(refusal))
        need(self.norm_bound == 0, "secure-aggregation",
             "norm-bound checks each update, which the coordinator never sees under secure aggregation "
             "(organizations clip their own deltas to secagg-clip)")
        need(self.min_nodes >= 2, "secure-aggregation", "needs min-nodes >= 2")

    def strategy_parameters(self) -> dict[str, Any]:
        """``strategy-params`` parsed: "mu=0.01,server_momentum=0.9" → dict."""
        params: dict[str, Any] = {}
        for pair in filter(None, (p.strip() for p in self.strategy_params.split(","))):
            key, sep, value = pair.partition("=")
            if not sep:
                raise JobConfigError(f"strategy-params: expected key=value, got {pair!r}")
            params[key.strip().replace("-", "_")] = _parse_scalar(value.strip())
        return params

    def build_strategy(self) -> Any:
        from strategies import build_strategy

        try:
            return build_strategy(self.strategy, self.strategy_parameters())
        except (ValueError, TypeError) as err:
            raise JobConfigError(f"strategy={self.strategy!r}: {err}") from None

    @property
    def quorum(self) -> int:
        return self.min_replies or self.min_nodes

    @property
    def lora(self) -> LoraSpec:
        return self.round_config(0).lora

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.run_dir) / "checkpoints"

    def round_config(self, server_round: int) -> RoundConfig:
        return RoundConfig(
            job_id=self.job_id,
            server_round=server_round,
            model=self.model,
            lora_rank=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_targets=self.lora_targets,
            lora_dropout=self.lora_dropout,
            local_steps=self.local_steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            max_length=self.max_length,
            seed=self.seed,
            test_fraction=self.test_fraction,
            eval_max_examples=self.eval_max_examples,
            update_encoding=self.update_encoding,
            sim_dataset=self.sim_dataset,
            sim_skew=self.sim_skew,
            sim_max_records=self.sim_max_records,
            sim_ranks=self.sim_ranks,
            sim_attack=self.sim_attack,
        )


def _parse_scalar(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _coerce(key: str, value: Any, target: type) -> Any:
    try:
        if target is bool:
            return bool(value)
        if target is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not a whole number")
            return int(value)
        if target is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError) as err:
        raise JobConfigError(f"{key}={value!r}: expected {target.__name__} ({err})") from None
