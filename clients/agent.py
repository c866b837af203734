"""The client agent: everything one organization runs to take part.

``Agent(...)`` reads and validates the organization's policy file
(clients/policy.py; a bad one is a PolicyError naming the key, before anything
starts); without one the agent enforces the default policy.

``Agent(data, ...)`` takes the datasets it offers: the values of
`silotune agent start --data` (``parse_data``: ``NAME=FILE``, or a bare
``FILE`` named by its stem), one path, or a mapping {name: path}. Names match
``[A-Za-z0-9._-]+`` and are unique; every dataset the policy's ``datasets``
rule lists must be offered (a typo would refuse every job). Each job names the
dataset it trains on (its ``dataset``; "" for the agent's only one).

``Agent.start()``:
1. validates every silo file (a bad file fails here, with its named error);
2. starts the organization's Ray — or joins the one named by ``RAY_ADDRESS`` —
   and on it the resident trainer (clients/resident_trainer.py), which loads
   the base model once and serves every round — with ``train_workers`` N > 1
   it trains each round on N Ray Train workers instead (clients/train_workers.py
   splits the devices: one GPU or one CPU per worker, no GPU for the actor);
3. starts the Flower SuperNode with node config ``silo-paths`` (``silo-path``
   for one bare ``--data FILE``, as before named datasets), ``org-name``,
   ``state-dir`` (where the agent's ε ledger lives), ``policy-path`` (with a
   policy file), ``ray-address`` and ``trainer-actor`` (and ``train-workers``,
   ``train-use-gpu`` when N > 1), so each ClientApp process forwards its
   instruction to the resident trainer and every round enforces the policy;
   with the resident trainer the SuperNode's app launcher keeps one warm
   runner process per app (clients/app_launcher.py), connected to that Ray,
   instead of a new ClientApp process per message.
``Agent.stop()`` stops what it started: the SuperNode (by PID, with its
children) and the Ray it started (not a Ray it merely joined).

``resident=False`` skips Ray: each ClientApp process then loads the model
itself (what a laptop or a test may prefer).

Run directly: ``python -m clients.agent --data silo.jsonl --coordinator HOST:PORT --insecure``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clients.local_ray import keep_ray_on_loopback
from clients.node_config import (NAMESPACE, ORG_NAME_KEY, POLICY_PATH_KEY, RANK_KEY, RAY_ADDRESS_KEY, SILO_PATH_KEY,
                                 SILO_PATHS_KEY, SIGNING_KEY_KEY, STATE_DIR_KEY, TRAINER_ACTOR_KEY, TRUSTED_PEERS_KEY,
                                 DatasetError, check_dataset_name, render_silo_paths)
from clients.policy import OrganizationPolicy, PolicyError, load_policy
from clients.resident_trainer import actor_name, start_resident_trainer
from clients.silo import Silo, load_silo
from clients.supernode import SuperNodeProcess
from clients.train_workers import TrainWorkersError, check_capacity, plan_devices

log = logging.getLogger("silotune.agent")

#: what Agent(data=...) accepts: `agent start --data` values (or one), one path, or {name: path}
Data = str | Path | Sequence[str] | Mapping[str, str | Path]


def split_data_value(value: str) -> tuple[str | None, str]:
    """One `--data` value → (the name given before '=', or None for a bare FILE; the file).

    A value whose part before the first '=' holds a path separator is a bare file
    (``/data/a=b.jsonl``); a file in the current folder whose name holds '=' is ``./a=b.jsonl``."""
    name, sep, file = value.partition("=")
    if sep and "/" not in name and os.sep not in name:
        return name, file
    return None, value


def parse_data(values: Sequence[str]) -> dict[str, Path]:
    """`--data` values → {name: resolved path}, in the order given; a DatasetError names the value.

    ``NAME=FILE`` names the dataset; a bare ``FILE`` is named by its stem (which must then be a
    valid name too, unless it is the agent's only dataset: a job reaches that one with ``dataset`` "").
    """
    if isinstance(values, str):
        raise TypeError("parse_data takes a list of --data values")
    if not values:
        raise DatasetError("--data: give at least one silo file (FILE or NAME=FILE)")
    datasets: dict[str, Path] = {}
    for value in values:
        given, file = split_data_value(value)
        if not file:
            raise DatasetError(f"--data {value!r}: no file (FILE or NAME=FILE)")
        name = given if given is not None else Path(file).stem
        if given is not None or len(values) > 1:
            try:
                check_dataset_name(name)
            except DatasetError as err:
                hint = "" if given is not None else " (the file's stem): name it, --data NAME=FILE"
                raise DatasetError(f"--data {value!r}: {err}{hint}") from None
        if name in datasets:
            raise DatasetError(f"--data: dataset {name!r} is given twice ({datasets[name]} and {file}); "
                               "give each a name of its own, --data NAME=FILE")
        datasets[name] = Path(file).resolve()
    return datasets


def _datasets(data: Data) -> tuple[dict[str, Path], bool]:
    """({name: path}, whether it is one bare file: node config `silo-path`, exactly as before names)."""
    if isinstance(data, Path):
        return {data.stem: data.resolve()}, True
    if isinstance(data, Mapping):
        datasets = {check_dataset_name(str(name)): Path(path).resolve() for name, path in data.items()}
        if not datasets:
            raise DatasetError("no dataset to offer")
        return datasets, False
    values = [data] if isinstance(data, str) else list(data)
    return parse_data(values), len(values) == 1 and split_data_value(values[0])[0] is None


class Agent:
    def __init__(
        self,
        data: Data,
        coordinator: str,
        *,
        name: str | None = None,
        state_dir: str | Path | None = None,
        resident: bool = True,
        gpus: float = 0.0,
        train_workers: int = 1,
        rank: int | None = None,
        policy: str | Path | None = None,
        supernode_options: dict[str, Any] | None = None,
        trusted_peers: str | Path | None = None,
    ) -> None:
        # the policy first: a bad file stops the agent before anything starts
        self.policy_path = Path(policy).resolve() if policy is not None else None
        self.policy = load_policy(self.policy_path) if self.policy_path is not None else OrganizationPolicy()
        # the datasets this agent offers, {name: silo file}; nothing is read until start()
        self.datasets, self._one_bare_file = _datasets(data)
        unknown = [d for d in self.policy.datasets if d not in self.datasets]
        if unknown:
            raise PolicyError(f"datasets: the policy lets jobs use {unknown}, which this agent does not offer "
                              f"(--data gives {', '.join(self.datasets)})")
        self.coordinator = coordinator
        self.silo_config = self._silo_config()  # a path the node config cannot carry fails here
        self.name = name or next(iter(self.datasets.values())).stem
        self.state_dir = Path(state_dir or f"runs/agent-{self.name}").resolve()
        self.resident = resident
        self.gpus = gpus
        self.plan = plan_devices(gpus, train_workers)  # refuses --gpus 1 --train-workers 2 before anything starts
        if self.plan.distributed and not resident:
            raise TrainWorkersError(f"{train_workers} train workers run on the agent's Ray: drop --no-resident")
        self.rank = rank
        self.supernode_options = supernode_options or {"insecure": True}
        # secure aggregation: the peers whose signed keys this organization accepts (a bad file stops here)
        self.trusted_peers = Path(trusted_peers).resolve() if trusted_peers is not None else None
        if self.trusted_peers is not None:
            from clients.secure_aggregation import load_trusted_peers

            load_trusted_peers(self.trusted_peers)
        self.silos: dict[str, Silo] = {}
        self.supernode: SuperNodeProcess | None = None
        self._started_ray = False
        self._actor: Any = None

    def start(self) -> "Agent":
        self.silos = {name: load_silo(path) for name, path in self.datasets.items()}  # a bad file fails here
        self.state_dir.mkdir(parents=True, exist_ok=True)
        node_config: dict[str, Any] = {**self.silo_config, ORG_NAME_KEY: self.name,
                                       STATE_DIR_KEY: str(self.state_dir)}
        if self.policy_path is not None:
            node_config[POLICY_PATH_KEY] = str(self.policy_path)
        if self.rank is not None:
            node_config[RANK_KEY] = self.rank
        if self.supernode_options.get("auth_private_key"):   # the node key also signs secure-aggregation keys
            node_config[SIGNING_KEY_KEY] = str(self.supernode_options["auth_private_key"])
        if self.trusted_peers is not None:
            node_config[TRUSTED_PEERS_KEY] = str(self.trusted_peers)
        try:
            if self.resident:
                node_config.update(self._start_resident())
            self.supernode = SuperNodeProcess().start(self.coordinator, node_config, self.state_dir,
                                                      **{"warm_runner": self.resident, **self.supernode_options})
        except BaseException:
            self.stop()
            raise
        return self

    def _silo_config(self) -> dict[str, str]:
        """The node config of the datasets: ``silo-path`` for one bare file (as before named
        datasets, so its path may hold any character), else ``silo-paths``."""
        if self._one_bare_file:
            return {SILO_PATH_KEY: str(next(iter(self.datasets.values())))}
        return {SILO_PATHS_KEY: render_silo_paths(self.datasets)}

    def _start_resident(self) -> dict[str, Any]:
        import ray

        address = os.environ.get("RAY_ADDRESS")
        self._started_ray = not address
        if self._started_ray:
            keep_ray_on_loopback()  # this Ray serves this machine only: no listener beyond 127.0.0.1
        ray.init(address=address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
                 num_gpus=None if address else self.gpus or None,
                 num_cpus=None if address else self.plan.ray_cpus(os.cpu_count() or 1))
        plan = self.plan
        check_capacity(plan, ray.cluster_resources(), {"CPU": plan.actor_cpus, "GPU": plan.actor_gpus})
        self._actor = start_resident_trainer(self.name, num_gpus=plan.actor_gpus, num_cpus=plan.actor_cpus)
        ray.get(self._actor.base_model_loads.remote())  # the actor is up before the SuperNode asks
        gcs = ray.get_runtime_context().gcs_address
        log.info("resident trainer %s on Ray %s (%s), %d train worker(s)%s", actor_name(self.name), gcs,
                 "started here" if self._started_ray else "joined", plan.train_workers,
                 " on one GPU each" if plan.use_gpu else "")
        return {RAY_ADDRESS_KEY: gcs, TRAINER_ACTOR_KEY: actor_name(self.name), **plan.node_config()}

    def base_model_loads(self) -> int | None:
        import ray

        return ray.get(self._actor.base_model_loads.remote()) if self._actor is not None else None

    def stop(self) -> None:
        if self.supernode is not None:
            self.supernode.stop()
            self.supernode = None
        if self._actor is not None or self._started_ray:
            import ray

            if self._actor is not None:
                ray.kill(self._actor)
                self._actor = None
            if self._started_ray:
                ray.shutdown()  # stops the Ray processes this agent started
                self._started_ray = False

    def serve(self) -> int:
        """Run until SIGTERM/SIGINT or until the SuperNode exits."""
        stop = {"now": False}

        def request_stop(signum: int, frame: object) -> None:
            stop["now"] = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        try:
            while not stop["now"] and self.supernode is not None and self.supernode.exited is None:
                time.sleep(0.5)
            code = self.supernode.exited if self.supernode is not None else None
            if code is not None and not stop["now"]:
                raise RuntimeError(f"SuperNode exited with code {code}:\n{self.supernode.log_tail()}")  # type: ignore[union-attr]
            return 0
        finally:
            self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, action="append", metavar="[NAME=]FILE",
                        help="a silo file this agent offers, named by NAME or the file's stem; repeatable")
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--name")
    parser.add_argument("--state-dir")
    parser.add_argument("--insecure", action="store_true", required=True)
    parser.add_argument("--no-resident", action="store_true", help="no Ray: each round loads the model")
    parser.add_argument("--gpus", type=float, default=0.0)
    parser.add_argument("--train-workers", type=int, default=1, help="Ray Train workers per round (DDP)")
    parser.add_argument("--rank", type=int)
    parser.add_argument("--policy", help="the organization's policy file (YAML; clients/policy.py)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent(args.data, args.coordinator, name=args.name, state_dir=args.state_dir,
                  resident=not args.no_resident, gpus=args.gpus, train_workers=args.train_workers,
                  rank=args.rank, policy=args.policy).start()
    return agent.serve()


if __name__ == "__main__":
    raise SystemExit(main())
