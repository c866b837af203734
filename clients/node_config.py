"""Every node-config key an organization's ClientApp reads, in one place.

A Flower node config is the per-organization settings the SuperNode hands
to each ClientApp process (``context.node_config``). Two writers fill it:
`silotune agent start` (clients/agent.py, through the SuperNode's
``--node-config``) in a deployment, and Flower's Simulation Engine for each
virtual organization in a simulation. The keys, who writes and who reads them:

``silo-path`` (SILO_PATH_KEY)
    The organization's silo file. Written by `silotune agent start`
    (``--data``); read by clients/local_data.py.
``org-name`` (ORG_NAME_KEY)
    The organization's name in the coordinator's report. Written by
    `silotune agent start` (``--name``, default the silo file's stem); read by
    clients/local_data.py.
``lora-rank`` (RANK_KEY)
    The LoRA rank this organization trains in heterogeneous-rank jobs. Written
    by `silotune agent start --rank`; read by clients/local_data.py.
``ray-address`` (RAY_ADDRESS_KEY), ``trainer-actor`` (TRAINER_ACTOR_KEY)
    The agent's Ray GCS address and the name of its resident trainer actor
    (in Ray namespace NAMESPACE). Written by `silotune agent start` unless
    ``--no-resident``; read by clients/app.py (whether to forward at all) and
    clients/resident_trainer.py (where to forward).
``train-workers`` (TRAIN_WORKERS_KEY), ``train-use-gpu`` (TRAIN_USE_GPU_KEY)
    Train each round on N Ray Train workers, on one GPU each or not. Written
    by `silotune agent start --train-workers N` (N > 1) through
    clients/train_workers.py's DevicePlan; read by clients/train_workers.py
    (``plan_from_node_config``) for clients/round_work.py.
``policy-path`` (POLICY_PATH_KEY)
    The organization's policy file: what its agent accepts from a coordinator
    (clients/policy.py). Written by `silotune agent start --policy FILE`
    (validated at start); read by clients/policy.py (``policy_for``) for
    clients/round_work.py. Absent: the safe default policy; a virtual
    organization (``partition-id``) gets the permissive simulation policy.
``state-dir`` (STATE_DIR_KEY)
    The agent's state directory (``--state-dir``). Written by `silotune agent
    start`; read by clients/privacy.py: the agent's own ε ledger
    (``privacy-ledger.json``, 0600) lives there, across jobs and restarts.
``signing-key`` (SIGNING_KEY_KEY)
    The organization's node private key (ORG.key, the one that authenticates
    its SuperNode), which signs its secure-aggregation keys and survivor sets.
    Written by `silotune agent start` (its ``--private-key``); read by
    clients/secure_aggregation.py. Absent (``--insecure``, simulation): unsigned.
``trusted-peers`` (TRUSTED_PEERS_KEY)
    A file of the peer organizations' public keys (their ORG.pub lines) or
    ``SHA256:`` fingerprints, distributed out of band: secure-aggregation
    sessions must be signed by them (protos/secagg/identity.py). Written by
    `silotune agent start --trusted-peers FILE`; read by
    clients/secure_aggregation.py. Absent: peers' signatures are not checked.
``dp-noise-seed`` (NOISE_SEED_KEY)
    Makes the local differential-privacy noise reproducible. Written by no
    silotune command: an operator (or a test) sets it by hand; read by
    clients/privacy.py.
``partition-id`` (PARTITION_ID_KEY), ``num-partitions`` (NUM_PARTITIONS_KEY)
    A virtual organization's index and the federation's size. Written by
    Flower's Simulation Engine; read by clients/local_data.py (the virtual
    silo, the name, the rank) and clients/attacks.py (simulated attackers).
    A deployed agent never has them.
"""

from __future__ import annotations

SILO_PATH_KEY = "silo-path"
ORG_NAME_KEY = "org-name"
RANK_KEY = "lora-rank"

NAMESPACE = "silotune"  # the Ray namespace of the resident trainer actor (not a key itself)
RAY_ADDRESS_KEY = "ray-address"
TRAINER_ACTOR_KEY = "trainer-actor"
TRAIN_WORKERS_KEY = "train-workers"
TRAIN_USE_GPU_KEY = "train-use-gpu"

NOISE_SEED_KEY = "dp-noise-seed"

POLICY_PATH_KEY = "policy-path"
STATE_DIR_KEY = "state-dir"

SIGNING_KEY_KEY = "signing-key"
TRUSTED_PEERS_KEY = "trusted-peers"

PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
