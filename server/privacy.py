"""The coordinator's privacy ledger: what a differentially private job has spent.

Flower's DP accountant only works with an unmodified FedAvg; ours follows our
own strategies (strategies/dp_fedavg.py) and our own round loop. The math is
strategies/accountant.py; this file decides *when* a round is charged and
stops the job before a round that would spend more than ``dp-epsilon-max``.

* "server" placement: a round is charged when its global is released (the
  strategy's ``finish_round``), with q = sampled/online. An attempt below
  quorum released nothing (no aggregate, no noise drawn) and is not charged.
* "local" placement: every attempt is charged (q = 1) as soon as it is sent
  out: the organizations' noised updates reach the coordinator whether or not
  the round then reaches quorum.
* secure aggregation (placement "server"): charged as "server". The released
  global is the same mechanism — the sum of deltas clipped to C, noise z·C
  added once — only the clipping moved to the organizations; an attempt that
  unmasks no sum released nothing.

The ledger is JSON and goes into every checkpoint's run_state ("privacy"):
a resumed coordinator continues it. The budget check comes after sampling and
before any instruction of the round is pushed.

The noise key (issue 11). dp-fedavg draws round k's noise from (key, k)
(strategies/dp_fedavg.py), so the noise is only as secret as the key. A fresh
job makes a random 256-bit key (``secrets``) when its first checkpoint is
written and keeps it in ``<run-dir>/secrets/dp-noise.key``: 0600 in a 0700
directory, written atomically, never under ``checkpoints/``, never in the
exported specialist or the report. Each checkpoint's ledger records only the
key's fingerprint (a hash), so whoever reads the checkpoints — a backup, a
colleague with the run-dir — holds consecutive noised globals and nothing to
rebuild the noise from. A resume reads the key back and refuses, by name, a
missing one (``NoiseKeyMissing``) or another one (``NoiseKeyMismatch``):
other noise would silently break the byte-identical resume, and a job that
continued without the key could not be told from one that never stopped.
With ``noise_seed`` set the key comes from the seed (reproducible, NOT
private) and no file is written.

Adjacency: add/remove one organization ("server"; McMahan et al. 2018), or
zero-out of one organization's contribution ("local": its clipped delta vs. a
zero delta). For replacing one organization's data by any other (sensitivity
2C) the same numbers hold at half the noise multiplier.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any

from server.checkpoint import fsync_dir, private_directory
from strategies.accountant import RdpAccountant
from strategies.dp_fedavg import NOISE_KEY_BYTES, PrivacyStep, PrivateStrategy, new_noise_key, noise_key_fingerprint

log = logging.getLogger("silotune.server")

ACCOUNTANT = ("RDP of the sampled Gaussian mechanism (Mironov, Talwar & Zhang 2019); (ε, δ) by the "
              "conversion of Balle et al. 2020 (Theorem 21)")


class PrivacyBudgetExhausted(RuntimeError):
    """The next round would spend more than dp-epsilon-max; the job stops before it."""


# ---- the noise key -------------------------------------------------------------
SECRETS_DIR = "secrets"
NOISE_KEY_FILE = "dp-noise.key"
_KEY_HEADER = "silotune dp-fedavg noise key v1"
_NOISE_KEY = "noise_key"   # its record in the ledger's state: source and fingerprint, never the key
NOISE_SOURCES = {
    "secret": "a random 256-bit key held by the coordinator (<run-dir>/secrets/), never in checkpoints or exports",
    "noise_seed": "noise_seed: reproducible, NOT private against whoever knows the seed",
}


class NoiseKeyError(RuntimeError):
    """The dp-fedavg noise key cannot be used to resume this job."""


class NoiseKeyMissing(NoiseKeyError):
    """The checkpoint's noise came from a key file that is no longer there."""


class NoiseKeyMismatch(NoiseKeyError):
    """The key on hand (or the noise_seed) is not the one the checkpoint's noise came from."""


def noise_key_path(run_dir: str | Path) -> Path:
    """Where a job keeps its noise key: apart from ``checkpoints/``, readable by the coordinator only."""
    return Path(run_dir) / SECRETS_DIR / NOISE_KEY_FILE


def write_noise_key(path: Path, key: bytes) -> None:
    """Write ``key`` to ``path`` atomically: 0600 from creation, in a 0700 directory, fsynced."""
    if len(key) != NOISE_KEY_BYTES:
        raise ValueError(f"a noise key has {NOISE_KEY_BYTES} bytes, got {len(key)}")
    directory = path.parent
    if private_directory(directory):
        fsync_dir(directory.parent)
    stale = f".{path.name}.tmp-"
    for entry in directory.iterdir():   # left by a coordinator killed mid-write (one writer per run-dir)
        if entry.name.startswith(stale):
            entry.unlink(missing_ok=True)
    tmp = directory / f"{stale}{os.getpid()}-{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(f"{_KEY_HEADER}\n{key.hex()}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)


def read_noise_key(path: Path) -> bytes:
    """The key in ``path``; NoiseKeyMissing if there is none, NoiseKeyError if it is not a key file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise NoiseKeyMissing(f"the dp-fedavg noise key {path} is missing") from None
    except OSError as e:
        raise NoiseKeyError(f"the dp-fedavg noise key {path} cannot be read: {e}") from e
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode & 0o777
        data = f.read(4096)
    if mode & 0o077:
        log.warning("the dp-fedavg noise key %s is readable by others (mode %o): chmod 600 it; whoever reads it "
                    "can remove the noise from the checkpoints' adapters", path, mode)
    lines = data.decode("ascii", errors="replace").split("\n")
    try:
        if lines[0] != _KEY_HEADER or lines[2:] != [""]:
            raise ValueError("not a silotune noise key file")
        key = bytes.fromhex(lines[1])
        if len(key) != NOISE_KEY_BYTES:
            raise ValueError(f"{len(key)} bytes, expected {NOISE_KEY_BYTES}")
    except (ValueError, IndexError) as e:
        raise NoiseKeyError(f"the dp-fedavg noise key {path} is damaged: {e}") from None
    return key


class PrivacyLedger:
    def __init__(self, strategy: PrivateStrategy, epsilon_max: float, delta: float,
                 secure_aggregation: bool = False, run_dir: str | Path | None = None) -> None:
        self.strategy = strategy
        self.secure_aggregation = secure_aggregation   # organizations clip; the coordinator sees only sums
        self.epsilon_max = float(epsilon_max)   # 0: no budget (still tracked and reported)
        self.delta = float(delta)
        self.accountant = RdpAccountant()
        self._pending: PrivacyStep | None = None
        # the job's noise key file when the coordinator draws noise from a secret key; without a
        # run_dir the strategy keeps its in-memory key (a resume is then refused: another key)
        self.noise_key_file = noise_key_path(run_dir) if run_dir is not None and self._secret_noise() else None
        self._key_settled = False   # the key is the job's: loaded on resume or made for a fresh job

    @classmethod
    def for_job(cls, strategy: Any, epsilon_max: float, delta: float,
                secure_aggregation: bool = False, run_dir: str | Path | None = None) -> "PrivacyLedger | None":
        """A ledger when the strategy is differentially private, else None."""
        if isinstance(strategy, PrivateStrategy):
            return cls(strategy, epsilon_max, delta, secure_aggregation, run_dir)
        return None

    # ---- the noise key ---------------------------------------------------------
    def _coordinator_noise(self) -> bool:
        """Whether the coordinator draws noise (from a key the strategy holds)."""
        return (self.strategy.noise_placement == "server" and self.strategy.noise_multiplier > 0
                and hasattr(self.strategy, "noise_key_fingerprint"))

    def _secret_noise(self) -> bool:
        return self._coordinator_noise() and getattr(self.strategy, "noise_key_source", None) == "secret"

    def _ensure_key(self) -> None:
        """A fresh job (nothing resumed): make its key, on disk before any checkpoint names it."""
        if self._key_settled:
            return
        if self.noise_key_file is not None:
            if self.noise_key_file.exists():
                # no checkpoint was resumed, so no released round used it: a new job gets a new key
                # (the same key in two jobs would let the difference of their globals cancel the noise)
                log.warning("replacing the noise key %s left by a job that has no checkpoint to resume",
                            self.noise_key_file)
            key = new_noise_key()
            write_noise_key(self.noise_key_file, key)
            self.strategy.set_noise_key(key)  # type: ignore[attr-defined]
            log.info("dp-fedavg noise key %s created (%s); the checkpoints record only its fingerprint",
                     self.noise_key_file, noise_key_fingerprint(key))
        self._key_settled = True

    def _key_record(self) -> dict[str, str] | None:
        if not self._coordinator_noise():
            return None
        strategy: Any = self.strategy
        return {"source": strategy.noise_key_source, "fingerprint": strategy.noise_key_fingerprint}

    def _resume_key(self, saved: Any) -> None:
        """Take up the key the checkpoint's noise came from, or refuse by name."""
        if not self._coordinator_noise():
            self._key_settled = True
            return
        strategy: Any = self.strategy
        if not isinstance(saved, dict) or not isinstance(saved.get("fingerprint"), str):
            raise NoiseKeyMismatch(
                "the checkpoint does not record which dp-fedavg noise key its noise came from (written by an "
                "older silotune, or by a job without noise at the coordinator): resuming would add other noise; "
                "start the job in a new run-dir")
        source, fingerprint = saved.get("source"), saved["fingerprint"]
        if source != strategy.noise_key_source:
            raise NoiseKeyMismatch(
                f"the checkpoint's noise came from {source!r}, this job's would come from "
                f"{strategy.noise_key_source!r} (noise_seed changed?): resuming would add other noise")
        if self.noise_key_file is not None:
            try:
                key = read_noise_key(self.noise_key_file)
            except NoiseKeyMissing:
                raise NoiseKeyMissing(
                    f"the dp-fedavg noise key {self.noise_key_file} is missing, and the checkpoint's noise came "
                    f"from key {fingerprint}: without it the job cannot resume with the same noise. Restore the "
                    "file (0600) from where the coordinator's secrets are kept, or start the job in a new "
                    "run-dir") from None
            if noise_key_fingerprint(key) != fingerprint:
                raise NoiseKeyMismatch(
                    f"the dp-fedavg noise key {self.noise_key_file} is {noise_key_fingerprint(key)}, the "
                    f"checkpoint's noise came from {fingerprint}: another job's key? Restore this job's key, or "
                    "start the job in a new run-dir")
            strategy.set_noise_key(key)
        elif strategy.noise_key_fingerprint != fingerprint:
            what = "noise_seed" if source == "noise_seed" else "noise key"
            raise NoiseKeyMismatch(
                f"this job's {what} ({strategy.noise_key_fingerprint}) is not the one the checkpoint's noise "
                f"came from ({fingerprint}): resuming would add other noise")
        self._key_settled = True

    @property
    def epsilon(self) -> float:
        return self.accountant.epsilon(self.delta)

    def before_round(self, server_round: int, sampled: int, online: int) -> PrivacyStep:
        """Plan the round with the strategy; stop before it if it would exceed the budget."""
        self._ensure_key()
        step = self.strategy.plan_round(sampled, online)
        if self.epsilon_max > 0:
            after = self.accountant.epsilon_after(self.delta, step.q, step.noise_multiplier)
            if after > self.epsilon_max:
                raise PrivacyBudgetExhausted(
                    f"privacy budget: round {server_round} would bring ε to {after:.4g} > dp-epsilon-max="
                    f"{self.epsilon_max:g} (δ={self.delta:g}, q={step.q:.4g}, z={step.noise_multiplier:g}); "
                    f"spent so far ε={self.epsilon:.4g} in {self.accountant.steps} charged round(s). "
                    f"The job stops before round {server_round}; the last checkpoint is its result."
                )
        if self.strategy.noise_placement == "local":
            self._charge(step)  # the noised updates leave the organizations with this attempt
            self._pending = None
        else:
            self._pending = step
        return step

    def released(self) -> None:
        """The round's global was computed (and is about to be released): charge it."""
        if self._pending is not None:
            self._charge(self._pending)
            self._pending = None

    def _charge(self, step: PrivacyStep) -> None:
        self.accountant.step(step.q, step.noise_multiplier)

    def round_summary(self) -> dict[str, float]:
        step = self.accountant.ledger[-1] if self.accountant.ledger else None
        return {"epsilon": self.epsilon, "delta": self.delta,
                "q": float(step["q"]) if step else math.nan}

    def provenance(self) -> dict[str, Any]:
        """What the exported specialist and report.json say about privacy."""
        strategy = self.strategy
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "epsilon_max": self.epsilon_max or None,
            "charged_rounds": self.accountant.steps,
            "ledger": [dict(e) for e in self.accountant.ledger],
            "noise_multiplier": strategy.noise_multiplier,
            "clip_norm": getattr(strategy, "clip_norm", None),
            "noise_placement": strategy.noise_placement,
            "secure_aggregation": self.secure_aggregation,
            "clipped_by": ("the coordinator" if strategy.noise_placement == "server" and not self.secure_aggregation
                           else "each organization"),
            "unit": "organization (client-level DP)",
            "adjacency": ("add/remove one organization" if strategy.noise_placement == "server"
                          else "zero-out one organization's contribution; against the coordinator too"),
            "accountant": ACCOUNTANT,
            "noise_source": (NOISE_SOURCES.get(getattr(strategy, "noise_key_source", ""))
                             if self._coordinator_noise() else None),
        }

    def state_dict(self) -> dict[str, Any]:
        """The accountant, and which key the noise came from (its fingerprint: never the key)."""
        self._ensure_key()
        return {**self.accountant.state_dict(), _NOISE_KEY: self._key_record()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Resume: the accountant, and the noise key (NoiseKeyMissing / NoiseKeyMismatch)."""
        state = state or {}
        accountant = {k: v for k, v in state.items() if k != _NOISE_KEY}
        if accountant:
            self.accountant.load_state_dict(accountant)
        self._resume_key(state.get(_NOISE_KEY))
