"""The coordinator's job configuration: the job's settings, checked.

The settings themselves (keys, defaults, help, who receives each) are
declared once in protos/job_settings.py; ``JobConfig`` adds the checks that
need the strategies and encodings, and derives what each organization
receives. Keys are the `[tool.flwr.app.config]` keys of pyproject.toml
(dashed), so ``flwr run . -c 'num-rounds=3'`` and scenario files use the same
names. An unknown key is an error, because a misspelt ``num-round`` silently
ignored would waste a day of GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from protos import codec
from protos.adapter import LoraSpec
from protos.task_spec import TaskSpec, TaskSpecError
from protos.job_settings import JobSettings, SettingsError
from protos.round_config import round_config, simulation_settings

#: simulated attacks (clients/attacks.py; a test checks both lists agree)
SIM_ATTACKS = ("sign-flip", "scale10", "flip10")

#: a bad run-config value, with the key named (the settings' own error)
JobConfigError = SettingsError


@dataclass(frozen=True)
class JobConfig(JobSettings):
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "JobConfig":
        config = super().from_run_config(run_config)
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
        for key in ("update-encoding", "global-encoding"):
            try:
                codec.encoding_from_name(getattr(self, key.replace("-", "_")))
            except ValueError as err:
                need(False, key, str(err))
        need(self.norm_bound >= 0, "norm-bound", "must be >= 0")
        need(self.max_update_bytes >= 0, "max-update-bytes", "must be >= 0 (0: derived from the adapter size)")
        need(self.max_weight >= 1, "max-weight", "must be >= 1 (example counts above it count as it)")
        need(self.dp_epsilon_max >= 0, "dp-epsilon-max", "must be >= 0 (0: no budget)")
        need(self.comm_budget_mb >= 0, "comm-budget-mb", "must be >= 0 (0: no budget)")
        need(0.0 < self.dp_delta < 1.0, "dp-delta", "must be in (0, 1)")
        need(bool(self.job_id.strip()), "job-id", "must not be empty")
        need(not self.init_adapter or Path(self.init_adapter).expanduser().is_dir(), "init-adapter",
             "no such folder (a PEFT adapter folder, e.g. a registered specialist's)")
        try:
            self.lora
        except ValueError as err:
            raise JobConfigError(f"lora settings: {err}") from None
        try:
            self.task_spec
        except TaskSpecError as err:
            raise JobConfigError(f"task settings: {err}") from None
        strategy = self.build_strategy()
        self._validate_secure_aggregation(strategy, need)
        from strategies.dp_fedavg import PrivateStrategy
        from strategies.registry import heterogeneous_rank_strategies

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
                 f"strategy {self.strategy!r} needs one rank for all; "
                 f"use {' or '.join(heterogeneous_rank_strategies())}")
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
    def task_spec(self) -> TaskSpec:
        return TaskSpec.from_config(self)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.run_dir) / "checkpoints"

    def round_config(self, server_round: int, **instructions: Any) -> Any:
        """What every organization receives for ``server_round`` (protos/round_config.py);
        ``instructions`` are the strategy's (StrategyInstructions fields)."""
        return round_config(self, server_round, **instructions)

    def simulation_settings(self) -> Any:
        """What the virtual organizations of a simulation receive besides; never a deployed agent."""
        return simulation_settings(self)


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

