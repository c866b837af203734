"""An organization's policy: what its agent accepts from any coordinator.

The coordinator decides how updates are combined; the organization decides
what it is willing to do with its data. ``OrganizationPolicy`` is that
decision, one field per rule, each with its default and its help (the README's
"Organization policy" table is rendered from them: ``render_policy_table``).
An agent reads it from a YAML file (``silotune agent start --policy FILE``,
validated at start; ``load_policy``); an unknown key, a value of the wrong type
or a bad value is a ``PolicyError`` that names the key.

Which policy applies (``policy_for(node_config)``):

* node config ``policy-path`` set (a deployed agent started with ``--policy``):
  that file, read once per process (restart the agent to change it);
* otherwise a virtual organization of a simulation (``partition-id``):
  ``SIMULATION_POLICY``, permissive — its silo is a public corpus and the
  built-in scenarios (batch 2, one local step, two evaluation examples) must
  run, and a local-DP experiment needs its learning curve
  (``unnoised_metrics_under_dp``); a test may still give it a ``policy-path``;
* otherwise (a deployed agent without ``--policy``): ``OrganizationPolicy()``,
  the defaults below.

Each comes bound to the datasets the node offers (``silo-paths``, or one
``silo-path``; ``offering``): what an agent offers is a fact of the node, not
a rule of the file, and the ``datasets`` rule needs it to refuse, before
anything is loaded, a job that names a dataset this agent does not offer or
that names none while the agent offers several. The reply then says
``policy_violation: datasets`` and nothing else: the coordinator cannot tell
a dataset that does not exist here from one the organization withholds, nor
learn the names the agent offers.

The defaults refuse only what no deployed organization should do: an update
or a metric that describes a single record (``min_batch_size`` 2,
``min_eval_examples`` 2) and a secure-aggregation session of two, where the
other organization's update is the sum minus one's own (``min_secure_session``
3). Every other rule is off by default, so the built-in demo, its tests and
the deployment suites run unchanged; an organization raises them in its file
(the README has an example).

Enforcement (clients/round_work.py): every rule that can be decided from the
instruction alone is checked before the base model is loaded, before the silo
file is opened and before anything is trained (``check``); two need the data
and are checked right after it is loaded, before anything is computed on it
(``check_data``: a train split smaller than ``min_batch_size`` would repeat
records inside a batch; a held-out split smaller than ``min_eval_examples``
would give metrics over fewer records). A refusal raises ``PolicyViolation``
(an ``UpdateRejected``: Flower's ClientApp turns it into an error reply, the
coordinator logs it); the reply says only ``policy_violation: <rule>`` — never
the detail, which may describe the data (how many held-out examples there
are) and goes to the agent's own log.

Decisions:

* ``min_eval_examples`` refuses rather than silently evaluating more: the
  check needs no data (``eval-max-examples`` is in the instruction), the
  coordinator learns that its setting is refused instead of receiving a score
  it did not ask for, and it is the same rule as the other floors. A held-out
  split smaller than the floor is refused too (after loading).
* Metrics: ``allowed_metrics`` (default: every metric sent today) filters
  what leaves. Under local DP — the instruction asks the organization to
  noise its update, or the policy requires local DP or caps ε — only metrics
  that do not depend on the data leave (``DATA_INDEPENDENT_METRICS``: step
  count, workers, the DP parameters, process counters), and the update's
  example count is sent as 1: DP protects the noised update only, and an
  un-noised training loss or count would leak outside ε. An evaluation has no
  such metric, so under local DP an evaluate instruction is refused
  (``allowed_metrics``), before any data is read — as is one whose
  ``num_examples`` may not leave (the coordinator cannot use a score without
  its count). ``unnoised_metrics_under_dp`` turns this off (the simulation
  policy does); an organization that sets it sends metrics outside its ε.
* ε: the agent keeps its own ledger (clients/privacy.py, ``EpsilonLedger``) in
  its state dir and charges every locally noised update before it leaves. With
  ``max_epsilon_per_job`` or ``max_epsilon_total`` set, an update without
  local noise (plain, or secure aggregation with the noise added by the
  coordinator) has no ε bound the agent can vouch for and is refused. The job
  id is the coordinator's to choose: ``max_epsilon_total`` is the cap a
  coordinator cannot sidestep by renaming jobs.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import re
import threading
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import yaml

from clients.evaluation import EVAL_METRICS
from clients.local_baseline import LOCAL_EVAL_METRICS
from clients.node_config import DATASET_NAME, PARTITION_ID_KEY, POLICY_PATH_KEY, offered_silos
from protos.errors import RejectReason, UpdateRejected

if TYPE_CHECKING:
    from clients.privacy import EpsilonLedger

log = logging.getLogger("silotune.client")

#: metrics of the process that answers (how often it loaded the base model, its pid)
PROCESS_METRICS = ("base_model_loads", "resident_pid")
#: metrics of a train reply (clients/trainer.py, clients/distributed.py, clients/round_work.py)
TRAIN_METRICS = ("train_loss", "train_loss_last", "train_steps", "train_tokens", "train_seconds",
                 "train_tokens_per_s", "train_workers", "train_wall_seconds", "dp_clip", "dp_noise")
#: every metric an organization sends today (``local_*``: its local-only adapter, job setting local-baseline)
KNOWN_METRICS = TRAIN_METRICS + EVAL_METRICS + LOCAL_EVAL_METRICS + PROCESS_METRICS
#: what may leave under local DP: functions of the instruction and the process, not of the data
DATA_INDEPENDENT_METRICS = frozenset({"train_steps", "train_workers", "dp_clip", "dp_noise", *PROCESS_METRICS})

#: the refusal for a ledger that cannot be read or written (not a field: no setting turns it off)
LEDGER_RULE = "epsilon_ledger"

_FINGERPRINT = re.compile(r"^blake2b:[0-9a-f]{32}$")


class PolicyError(ValueError):
    """A policy that cannot be used (unknown key, wrong type, bad value), with the key named."""


class PolicyViolation(UpdateRejected):
    """An instruction this organization's policy refuses.

    What leaves the organization (``str``, which Flower puts in the error
    reply) is ``policy_violation: <rule>`` only; ``detail`` says why, for the
    agent's own log, and may describe the data."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(RejectReason.POLICY_VIOLATION, rule)
        self.rule = rule
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:  # through Ray (the resident trainer) with both fields
        return (type(self), (self.rule, self.detail))


def rule(default: Any, help: str, kind: str) -> Any:  # noqa: A002 (the name job_settings uses)
    return field(default=default, metadata={"help": help, "kind": kind})


@dataclass(frozen=True)
class OrganizationPolicy:
    """What this organization's agent accepts. Field order is the order rules are checked in."""

    allowed_base_models: tuple[str, ...] = rule(
        (), "base models this agent trains and evaluates: names as the coordinator's `model` gives them "
        "(smollm2-135m, a folder, a Hub id) and/or weight fingerprints `blake2b:<32 hex>` (what every "
        "header carries; checked against the loaded weights). Empty: any", "names")
    allowed_job_ids: tuple[str, ...] = rule(
        (), "job ids this agent takes part in, as glob patterns (`consortium-*`). Empty: any", "names")
    datasets: tuple[str, ...] = rule(
        (), "the datasets (`agent start --data NAME=FILE`) a job may name in its `dataset`; a job naming "
        "another, one this agent does not offer, or none while it offers several is refused before anything "
        "is loaded. Empty: every dataset the agent offers", "names")
    max_rounds_per_job: int | None = rule(
        None, "refuse every instruction of a job past this round. null: no cap", "optional int")
    max_rank: int | None = rule(
        None, "the largest LoRA rank this organization trains or evaluates (its own `--rank`, else the "
        "job's `lora-r`). null: no cap", "optional int")
    min_batch_size: int = rule(
        2, "train: the smallest batch (`batch-size`) accepted; a train split smaller than this is refused "
        "too (a batch would repeat records). 2: no update from one record's gradient", "int")
    min_local_steps: int = rule(
        1, "train: the fewest optimizer steps per round (`local-steps`) accepted", "int")
    min_eval_examples: int = rule(
        2, "evaluate: the fewest held-out examples a score may describe; an instruction asking fewer "
        "(`eval-max-examples`) is refused before any data is read, a held-out split with fewer after "
        "loading. 2: no metric of one record", "int")
    require_secure_aggregation: bool = rule(
        False, "train: refuse a plain train instruction; take part only in secure-aggregation rounds "
        "(the coordinator sees the sum, never this organization's update)", "bool")
    min_secure_session: int = rule(
        3, "secure aggregation: the fewest inputs in a sum the coordinator can unmask — the session's "
        "organizations N and its threshold t must both reach it (checked at the advertise stage, before a key "
        "is made, and again before training). With 2, each one's update is the sum minus the other's", "int")
    require_local_dp: bool = rule(
        False, "train: refuse an instruction that does not clip and noise the update here, before it "
        "leaves (dp-fedavg with noise_placement=local)", "bool")
    min_dp_noise: float = rule(
        0.0, "train: whenever this organization noises its update, the noise multiplier z (`dp_noise`) "
        "must be at least this", "float")
    max_epsilon_per_job: float | None = rule(
        None, "train: the ε (at dp_delta) one job may spend of this organization's ledger; a round "
        "that would spend more is refused, and so is any update without local noise. null: no cap", "optional float")
    max_epsilon_total: float | None = rule(
        None, "train: the ε (at dp_delta) all jobs together may spend, across restarts (the ledger in the "
        "state dir); as above. null: no cap", "optional float")
    dp_delta: float = rule(
        1e-5, "the δ at which this agent's ledger reports ε and the caps are checked", "float")
    allowed_metrics: tuple[str, ...] = rule(
        KNOWN_METRICS, "the metrics that may leave (the others are dropped); under local DP only the "
        "data-independent ones, and an evaluation (all its metrics describe data) is refused. An "
        "evaluation is refused too when num_examples may not leave", "names")
    unnoised_metrics_under_dp: bool = rule(
        False, "let the allowed metrics (and the example count) leave un-noised even under local DP — outside "
        "ε. The simulation policy sets it (public corpora, learning curves); an organization's data: leave it off",
        "bool")

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), f.metadata["kind"]))
        _validate(self)

    # ---- the node it is enforced on ----------------------------------------------
    def offering(self, names: tuple[str, ...]) -> "OrganizationPolicy":
        """This policy, bound to the dataset names its node offers (not a rule: the same
        file serves agents that offer different data). Equal to ``self``: rules only compare."""
        bound = copy.copy(self)
        object.__setattr__(bound, "_offered_datasets", tuple(names))
        return bound

    @property
    def offered_datasets(self) -> tuple[str, ...] | None:
        """The dataset names the node offers (``offering``); None: not known (the rule alone applies)."""
        return self.__dict__.get("_offered_datasets")

    # ---- what the rules say --------------------------------------------------
    @property
    def capped(self) -> bool:
        return self.max_epsilon_per_job is not None or self.max_epsilon_total is not None

    @property
    def cap_rule(self) -> str:
        return "max_epsilon_per_job" if self.max_epsilon_per_job is not None else "max_epsilon_total"

    def under_local_dp(self, request: "Request") -> bool:
        """Whether only what DP protects may leave in answer to ``request``."""
        dp = self.require_local_dp or self.capped or request.local_noise
        return dp and not self.unnoised_metrics_under_dp

    def check(self, request: "Request") -> None:
        """Refuse ``request`` by the first rule it violates (PolicyViolation). Needs no data."""
        if self.allowed_job_ids and not any(fnmatch.fnmatchcase(request.job_id, p) for p in self.allowed_job_ids):
            raise PolicyViolation("allowed_job_ids",
                                  f"job {request.job_id!r} matches none of {list(self.allowed_job_ids)}")
        self._check_dataset(request)
        if self.allowed_base_models and not ({request.model, request.fingerprint} & set(self.allowed_base_models)):
            raise PolicyViolation("allowed_base_models", f"base model {request.model!r} ({request.fingerprint}) "
                                  f"is not among {list(self.allowed_base_models)}")
        if self.max_rounds_per_job is not None and request.server_round > self.max_rounds_per_job:
            raise PolicyViolation("max_rounds_per_job", f"round {request.server_round} of job {request.job_id!r} "
                                  f"> {self.max_rounds_per_job}")
        if self.max_rank is not None and request.rank > self.max_rank:
            raise PolicyViolation("max_rank", f"LoRA rank {request.rank} > {self.max_rank}")
        if request.kind == "train":
            self._check_train(request)
        else:
            self._check_evaluate(request)

    def _check_dataset(self, request: "Request") -> None:
        """The job's ``dataset`` ("": the agent's only one) must be offered here and allowed by the rule."""
        offered, name = self.offered_datasets, request.dataset
        if offered is not None:
            if not name and len(offered) == 1:
                name = offered[0]
            if not name:
                raise PolicyViolation("datasets", f"the job names no dataset and this agent offers "
                                      f"{len(offered)}: {', '.join(offered)}")
            if name not in offered:
                raise PolicyViolation("datasets", f"the job asks for dataset {name!r}; this agent offers "
                                      f"{', '.join(offered)}")
        if self.datasets and name and name not in self.datasets:
            raise PolicyViolation("datasets", f"dataset {name!r} is not among {list(self.datasets)}")

    def _check_train(self, request: "Request") -> None:
        if request.batch_size < self.min_batch_size:
            raise PolicyViolation("min_batch_size", f"batch size {request.batch_size} < {self.min_batch_size}")
        if request.local_steps < self.min_local_steps:
            raise PolicyViolation("min_local_steps", f"{request.local_steps} local steps < {self.min_local_steps}")
        if self.require_secure_aggregation and not request.secure:
            raise PolicyViolation("require_secure_aggregation", "a plain train instruction: the update would "
                                  "reach the coordinator unmasked")
        if request.secure_session is not None and request.secure_session < self.min_secure_session:
            raise PolicyViolation("min_secure_session", f"a secure-aggregation session whose coordinator can unmask "
                                  f"a sum of {request.secure_session} inputs < {self.min_secure_session}")
        if self.require_local_dp and not request.local_noise:
            raise PolicyViolation("require_local_dp", f"the instruction asks no noise at this organization "
                                  f"(dp_clip {request.dp_clip}, dp_noise {request.dp_noise}, "
                                  f"{'secure' if request.secure else 'plain'} round)")
        noised_here = not request.secure and request.dp_clip > 0
        if noised_here and request.dp_noise < self.min_dp_noise:
            raise PolicyViolation("min_dp_noise", f"noise multiplier {request.dp_noise} < {self.min_dp_noise}")

    def _check_evaluate(self, request: "Request") -> None:
        if request.eval_examples < self.min_eval_examples:
            raise PolicyViolation("min_eval_examples", f"eval-max-examples {request.eval_examples} "
                                  f"< {self.min_eval_examples}")
        if self.under_local_dp(request):
            raise PolicyViolation("allowed_metrics", "under local DP no un-noised metric leaves, and every "
                                  "evaluation metric describes the held-out data un-noised")
        if "num_examples" not in self.allowed_metrics:
            raise PolicyViolation("allowed_metrics", "num_examples may not leave: a score without its count "
                                  "is of no use to the coordinator")

    def check_data(self, request: "Request", *, train_examples: int, eval_examples: int) -> None:
        """The two rules that need the loaded split sizes (checked before anything is computed on them)."""
        if request.kind == "train" and train_examples < self.min_batch_size:
            raise PolicyViolation("min_batch_size", f"the train split holds {train_examples} examples "
                                  f"< {self.min_batch_size}: a batch would repeat records")
        if request.kind == "evaluate" and eval_examples < self.min_eval_examples:
            raise PolicyViolation("min_eval_examples", f"{eval_examples} held-out examples to score "
                                  f"< {self.min_eval_examples}")

    # ---- ε ---------------------------------------------------------------------
    def check_epsilon(self, job: float, total: float) -> None:
        """Refuse when ε after the update would pass a cap (``job``, ``total``: ε after it)."""
        if self.max_epsilon_per_job is not None and job > self.max_epsilon_per_job:
            raise PolicyViolation("max_epsilon_per_job", f"this update would bring the job's ε to {job:.4g} "
                                  f"> {self.max_epsilon_per_job:g} (δ = {self.dp_delta:g})")
        if self.max_epsilon_total is not None and total > self.max_epsilon_total:
            raise PolicyViolation("max_epsilon_total", f"this update would bring the organization's ε to "
                                  f"{total:.4g} > {self.max_epsilon_total:g} (δ = {self.dp_delta:g})")

    def check_budget(self, request: "Request", ledger: "EpsilonLedger | None") -> None:
        """Before anything is trained: would the update this train instruction asks for fit the caps?"""
        if not self.capped:
            return
        if not request.local_noise:
            raise PolicyViolation(self.cap_rule, "an update without noise added here has no ε bound this "
                                  "agent can vouch for")
        if ledger is None:
            raise PolicyViolation(self.cap_rule, "no ε ledger: the node config names no state dir")
        from clients.privacy import LedgerError

        try:
            job, total = ledger.spent(request.job_id, self.dp_delta, noise=request.dp_noise)
        except LedgerError as err:
            raise PolicyViolation(LEDGER_RULE, str(err)) from None
        self.check_epsilon(job, total)

    def charge(self, request: "Request", ledger: "EpsilonLedger") -> tuple[float, float]:
        """Record the locally noised update in the ledger, re-checking the caps under its lock.
        Called before the update leaves; returns (job ε, total ε) after it."""
        from clients.privacy import LedgerError

        try:
            return ledger.charge(request.job_id, request.server_round, request.dp_noise, self.dp_delta,
                                 check=self.check_epsilon)
        except LedgerError as err:
            raise PolicyViolation(LEDGER_RULE, str(err)) from None

    def outgoing_metrics(self, metrics: Mapping[str, float], *, dp: bool) -> dict[str, float]:
        """The metrics that may leave: the allowed ones; under local DP only the data-independent ones."""
        allowed = set(self.allowed_metrics) & (DATA_INDEPENDENT_METRICS if dp else set(KNOWN_METRICS))
        return {key: value for key, value in metrics.items() if key in allowed}

    # ---- presentation ------------------------------------------------------------
    def rows(self) -> list[tuple[str, str, str]]:
        """(rule, its value here, what it means), every field in order."""
        return [(f.name, describe_value(f.name, getattr(self, f.name)), f.metadata["help"]) for f in fields(self)]

    def as_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


@dataclass(frozen=True)
class Request:
    """What an instruction asks of this organization, read from the instruction alone (no data)."""

    kind: str                    # "train" or "evaluate"
    job_id: str
    server_round: int
    model: str                   # the base model as the coordinator names it
    fingerprint: str             # the base-model fingerprint the global adapter's header claims
    rank: int                    # the LoRA rank this organization would train / load
    batch_size: int
    local_steps: int
    eval_examples: int           # eval-max-examples
    dp_clip: float
    dp_noise: float
    secure_session: int | None   # secure aggregation: the fewest inputs of an unmaskable sum, min(N, t); None: plain
    dataset: str = ""            # the job's `dataset`; "": the agent's only one

    @property
    def secure(self) -> bool:
        return self.secure_session is not None

    @property
    def local_noise(self) -> bool:
        """The update is clipped and noised here, before it leaves (local DP)."""
        return not self.secure and self.dp_clip > 0 and self.dp_noise > 0


_CACHE: dict[str, OrganizationPolicy] = {}
_BOUND: dict[tuple[str, tuple[str, ...]], OrganizationPolicy] = {}  # (file, offered datasets): its bound copy
_CACHE_LOCK = threading.Lock()


def policy_for(node_config: Mapping[str, Any]) -> OrganizationPolicy:
    """The policy this node enforces: its policy file (read once per process), else the
    simulation policy for a virtual organization, else the defaults; bound to the datasets
    the node offers, if it names any."""
    offered = tuple(offered_silos(node_config))
    if POLICY_PATH_KEY in node_config:
        path = str(node_config[POLICY_PATH_KEY])
        with _CACHE_LOCK:
            if path not in _CACHE:
                _CACHE[path] = load_policy(path)
            if not offered:
                return _CACHE[path]
            if (path, offered) not in _BOUND:
                _BOUND[(path, offered)] = _CACHE[path].offering(offered)
            return _BOUND[(path, offered)]
    policy = SIMULATION_POLICY if PARTITION_ID_KEY in node_config else OrganizationPolicy()
    return policy.offering(offered) if offered else policy


def forget_cached_policies() -> None:
    """Drop the per-process cache (what a restarted agent starts with)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _BOUND.clear()


def load_policy(path: str | Path) -> OrganizationPolicy:
    """A policy file (YAML mapping of rule: value); PolicyError naming the key on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"policy file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PolicyError(f"policy file {path} cannot be read: {err}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise PolicyError(f"policy file {path} is not valid YAML: {err}") from None
    try:
        return policy_from_mapping({} if raw is None else raw)
    except PolicyError as err:
        raise PolicyError(f"policy file {path}: {err}") from None


def policy_from_mapping(raw: Any) -> OrganizationPolicy:
    if not isinstance(raw, dict):
        raise PolicyError(f"expected a mapping of rule: value, got {type(raw).__name__}")
    known = {f.name: f for f in fields(OrganizationPolicy)}
    for key in raw:
        if key not in known:
            raise PolicyError(f"unknown key {key!r}; valid keys: {', '.join(known)}")
    return OrganizationPolicy(**raw)


def describe_value(name: str, value: Any) -> str:
    if value is None:
        return "no cap"
    if isinstance(value, tuple):
        return ", ".join(value) if value else "any"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def render_policy_table() -> str:
    """The README's field table (tests/test_policy.py keeps the README in sync with it)."""
    lines = ["| field | default | meaning |", "|---|---|---|"]
    for f in fields(OrganizationPolicy):
        default = f.default if f.default is not MISSING else None
        shown = "every metric sent today" if f.name == "allowed_metrics" else describe_value(f.name, default)
        lines.append(f"| `{f.name}` | {shown} | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"


# ---- types and values ------------------------------------------------------------

def _coerce(key: str, value: Any, kind: str) -> Any:
    optional = kind.startswith("optional ")
    base = kind.removeprefix("optional ")
    if value is None:
        if optional:
            return None
        raise PolicyError(f"{key}: a value is required (null is not one)")
    if base == "names":
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise PolicyError(f"{key}: expected a list of strings, got {value!r}")
        if not all(isinstance(v, str) and v.strip() for v in value):
            raise PolicyError(f"{key}: every entry must be a non-empty string, got {list(value)!r}")
        return tuple(v.strip() for v in value)
    if base == "bool":
        if not isinstance(value, bool):
            raise PolicyError(f"{key}: expected true or false, got {value!r}")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise PolicyError(f"{key}: expected an integer, got {value!r}")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PolicyError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise PolicyError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    raise AssertionError(f"unknown kind {kind!r}")


def _validate(p: OrganizationPolicy) -> None:
    for key in ("min_batch_size", "min_local_steps", "min_eval_examples", "max_rounds_per_job", "max_rank"):
        value = getattr(p, key)
        if value is not None and value < 1:
            raise PolicyError(f"{key}: must be at least 1, got {value}")
    if p.min_secure_session < 2:
        raise PolicyError(f"min_secure_session: secure aggregation needs at least 2 organizations, "
                          f"got {p.min_secure_session}")
    if p.min_dp_noise < 0:
        raise PolicyError(f"min_dp_noise: must be >= 0, got {p.min_dp_noise}")
    for key in ("max_epsilon_per_job", "max_epsilon_total"):
        value = getattr(p, key)
        if value is not None and not value > 0:
            raise PolicyError(f"{key}: must be > 0 (or null: no cap), got {value}")
    if not 0 < p.dp_delta < 1:
        raise PolicyError(f"dp_delta: must be in (0, 1), got {p.dp_delta}")
    for name in p.datasets:
        if not DATASET_NAME.fullmatch(name):
            raise PolicyError(f"datasets: {name!r} is not a dataset name (letters, digits, '.', '_' and '-')")
    for entry in p.allowed_base_models:
        if entry.startswith("blake2b:") and not _FINGERPRINT.match(entry):
            raise PolicyError(f"allowed_base_models: {entry!r} is not a fingerprint (blake2b: and 32 hex digits)")
    unknown = [m for m in p.allowed_metrics if m not in KNOWN_METRICS]
    if unknown:
        raise PolicyError(f"allowed_metrics: unknown metrics {unknown}; known: {', '.join(KNOWN_METRICS)}")
    if p.require_secure_aggregation and p.require_local_dp:
        raise PolicyError("require_secure_aggregation: with require_local_dp no train instruction could pass "
                          "(under secure aggregation the noise goes on the sum, never at the organization)")
    if p.require_secure_aggregation and p.capped:
        raise PolicyError(f"require_secure_aggregation: with {p.cap_rule} no train instruction could pass "
                          "(a capped agent sends only locally noised updates, which secure aggregation never asks)")


#: virtual organizations of a simulation (node config ``partition-id``): a public corpus, the built-in scenarios
SIMULATION_POLICY = OrganizationPolicy(min_batch_size=1, min_local_steps=1, min_eval_examples=1, min_secure_session=2,
                                       unnoised_metrics_under_dp=True)
