"""The randomness model: one place that owns every random stream of a run.

DP-SGD's epsilon holds only if the randomness its proof relies on -- which examples each
Poisson batch drew, and the Gaussian noise -- is secret from the attacker, who reads
everything a run writes (DESIGN.md, "Whom epsilon must hold against"). So a run has four
independent streams, and only two of them are secret:

=========  ===========================================  ===========================
stream     what it drives                               source
=========  ===========================================  ===========================
init       model initialisation                         torch, the public ``--seed``
aug        augmentation crops and flips                 torch, the public ``--seed``
sampler    Poisson batch selection (secret)             ChaCha20 under the run key
noise      the Gaussian noise of every step (secret)    ChaCha20 under the run key
=========  ===========================================  ===========================

The *run key* is 256 bits. Each secret stream is a ChaCha20 keystream (a cryptographic
generator) under its own subkey ``HMAC-SHA256(run key, stream name)``, so neither secret
stream predicts the other, and each draw (one step) uses its own nonce, so a stream's
state is a draw counter that a checkpoint can hold without holding the key.

Where the run key comes from is the *noise mode*:

- ``secure`` (the default of ``scalemix train``): 32 bytes from the operating system's
  CSPRNG (``os.urandom``), held in memory only and never written anywhere. Not
  reproducible; a resumed run draws a fresh key.
- ``public`` (non-private runs only): ``SHA-256("scalemix/public/v1/<seed>")``; nothing
  is protected, so batches are reproducible from ``--seed`` alone.
- ``seeded`` (research reproducibility; the default inside ablation grids, where the same
  batches and noise across cells are common random numbers that sharpen paired
  comparisons): ``HMAC-SHA256(seed key, "scalemix/seeded/v1/<seed>")``. The *seed key* is
  a 256-bit secret kept in a file outside every run directory (``$SCALEMIX_SEED_KEY``, or
  ``~/.config/scalemix/seed-key``, created on first use with mode 0600). Runs record only
  its fingerprint (``seed_key_id``). The published ``--seed`` alone determines nothing
  secret; epsilon then assumes that the seed key stays secret, and every output that
  shows epsilon says so.

Gaussian noise is made from the keystream by the Box--Muller transform (53-bit uniforms
for the radius, 32-bit for the angle, in float64 on the run's device), pair by pair, so
that the first k normals of a draw do not depend on how many follow. Floating-point
side channels (Mironov 2012) are not mitigated.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from pathlib import Path

import torch

from scalemix.choices import NOISE_MODES
from scalemix.errors import ConfigError

SECRET_STREAMS = ("sampler", "noise")
KEY_BYTES = 32
SEED_KEY_ENV = "SCALEMIX_SEED_KEY"
_SEEDED_CONTEXT = b"scalemix/seeded/v1/"
NORMAL_BLOCK = 2**15  # Box--Muller pairs computed at once (256 KB of float32 noise)
_MASK53 = (1 << 53) - 1


# --------------------------------------------------------------------------- the seed key


def seed_key_path() -> Path:
    """Where the seed key of seeded mode lives (never inside a run directory)."""
    env = os.environ.get(SEED_KEY_ENV)
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "scalemix" / "seed-key"


def load_seed_key(create: bool = True) -> bytes:
    """Read the 256-bit seed key; create it (0600, race-free) when missing."""
    path = seed_key_path()
    if not path.exists():
        if not create:
            raise ConfigError(f"no seed key at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another worker of the same grid made it first
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(os.urandom(KEY_BYTES).hex() + "\n")
    try:
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"cannot read the seed key {path} ({e}); it must hold {2 * KEY_BYTES} hex digits. "
            f"Point ${SEED_KEY_ENV} at a valid key file, or move the broken one away"
        ) from None
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"the seed key {path} holds {len(key)} bytes, not {KEY_BYTES}; "
            f"point ${SEED_KEY_ENV} at a valid key file, or move the broken one away"
        )
    return key


def key_id(key: bytes) -> str:
    """A public fingerprint of a key: equal keys have equal ids; the id reveals nothing."""
    return hashlib.sha256(b"scalemix/key-id/" + key).hexdigest()[:16]


# --------------------------------------------------------------------------- one secret stream


class SecretStream:
    """A ChaCha20 keystream under ``HMAC-SHA256(key, name)``; one nonce per draw.

    ``draws`` (how many draws were taken) is the whole state: with the same key, a stream
    restored to the same count continues identically. The key is never part of the state.
    """

    def __init__(self, key: bytes, name: str):
        if len(key) != KEY_BYTES:
            raise ValueError(f"a stream key has {KEY_BYTES} bytes, got {len(key)}")
        self.name = name
        self._key = hmac.new(key, b"scalemix/stream/" + name.encode(), hashlib.sha256).digest()
        self.draws = 0

    def _keystream(self):
        """The next draw's keystream (ChaCha20 block counter from 0), read with ``update``."""
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        # cryptography's 16-byte ChaCha20 nonce: 4-byte block counter || 12-byte nonce.
        nonce = (0).to_bytes(4, "little") + self.draws.to_bytes(12, "little")
        self.draws += 1
        return Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()

    def random_bytes(self, n: int) -> bytes:
        """The next draw: ``n`` bytes of keystream."""
        return self._keystream().update(bytes(n))

    @staticmethod
    def _to_tensor(raw: bytes, device: torch.device) -> torch.Tensor:
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)

    def _raw(self, nbytes: int, device: torch.device) -> torch.Tensor:
        return self._to_tensor(self.random_bytes(nbytes), device)

    def uniform(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``n`` float64 uniforms in [0, 1) with 53 random bits each (one draw)."""
        if n == 0:
            self.draws += 1
            return torch.zeros(0, dtype=torch.float64, device=device)
        bits = self._raw(8 * n, torch.device(device)).view(torch.int64)
        return ((bits >> 11) & _MASK53).to(torch.float64).mul_(2.0**-53)

    def normal(
        self, n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``n`` standard normals by Box--Muller (one draw), returned in ``dtype``."""
        blocks = list(self.normal_blocks(n, device, dtype))
        if not blocks:
            return torch.zeros(0, dtype=dtype, device=torch.device(device))
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def normal_blocks(
        self, n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ):
        """The ``n`` normals of one draw, in consecutive pieces of ``NORMAL_BLOCK`` pairs
        (the draw is taken now; the pieces are made as they are read). The pieces of a
        draw are the same whoever reads them, ``normal`` included: a model's worth of
        noise never needs more than one piece's working memory."""
        device = torch.device(device)
        stream = self._keystream()
        return self._normal_pieces(stream, (n + 1) // 2, n, device, dtype)

    @classmethod
    def _normal_pieces(cls, stream, half: int, n: int, device, dtype):
        # 12 bytes per pair, pair by pair, so the first k normals of a draw do not depend
        # on how many follow (a run with an audit vector appended keeps the model's noise).
        math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for start in range(0, half, NORMAL_BLOCK):
            pairs = min(NORMAL_BLOCK, half - start)
            # three little-endian 32-bit words a pair: the radius's 64 bits (low, high word)
            # and the angle's 32; read as words, never as strided bytes
            words = cls._to_tensor(stream.update(bytes(12 * pairs)), device).view(torch.int32)
            words = words.view(pairs, 3)
            low = words[:, 0].to(torch.int64) & 0xFFFFFFFF
            high = words[:, 1].to(torch.int64) & 0xFFFFFFFF
            # the top 53 of the radius's 64 bits
            u1 = ((high << 21) | (low >> 11)).to(torch.float64).add_(1.0).mul_(2.0**-53)  # (0, 1]
            a_bits = words[:, 2]
            # The radius carries the tails: float64 log of a 53-bit uniform (to 8.6 sigma);
            # the angle needs only the output precision.
            radius = u1.log_().mul_(-2.0).sqrt_().to(math_dtype)
            angle = a_bits.to(math_dtype).mul_(2.0 * math.pi / 2.0**32)  # [-pi, pi)
            z = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
            yield z.flatten()[: n - 2 * start].to(dtype)

    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])


# --------------------------------------------------------------------------- a run's streams


class RunRandomness:
    """Every random stream of one run, and the statement of what epsilon assumes."""

    def __init__(self, mode: str, seed: int, device: torch.device | str = "cpu", rank: int = 0):
        if mode not in (*NOISE_MODES, "public"):
            raise ConfigError(f"--noise {mode!r} is not one of: {', '.join(NOISE_MODES)}")
        self.mode, self.seed, self.device = mode, int(seed), torch.device(device)
        self.seed_key_id = None
        if mode == "secure":
            run_key = os.urandom(KEY_BYTES)  # never written anywhere
        elif mode == "public":  # non-private runs: nothing to hide, reproducible from --seed
            run_key = hashlib.sha256(b"scalemix/public/v1/" + str(self.seed).encode()).digest()
        else:
            seed_key = load_seed_key()
            self.seed_key_id = key_id(seed_key)
            run_key = hmac.new(
                seed_key, _SEEDED_CONTEXT + str(self.seed).encode(), hashlib.sha256
            ).digest()
        # data-parallel rank r > 0 (train/distributed.py): its own sampler and noise share,
        # independent of every other rank's; rank 0 is the single-process run
        suffix = f"/rank{rank}" if rank else ""
        self.sampler = SecretStream(run_key, "sampler" + suffix)
        self.noise = SecretStream(run_key, "noise" + suffix)
        self.canary = SecretStream(run_key, "canary")  # audit canaries: coins, coordinates
        del run_key
        # Public streams: the model seed is published, and so may be everything it drives.
        self.aug = torch.Generator(device=self.device).manual_seed(self.seed + 1)

    def init_model_rng(self) -> None:
        """Seed torch's global generator for model initialisation (public)."""
        torch.manual_seed(self.seed)

    @property
    def label(self) -> str:
        if self.mode == "public":
            return "public (non-private run: batches reproducible from --seed)"
        if self.mode == "secure":
            return "secure (sampling and noise from a 256-bit OS-entropy key, never written)"
        return f"seeded (reproducible; sampling and noise keyed by seed key {self.seed_key_id})"

    @property
    def assumption(self) -> str:
        """The sentence every output that shows epsilon carries."""
        if self.mode == "public":
            return "non-private run: no epsilon"
        if self.mode == "secure":
            return (
                "epsilon assumes only what DP-SGD's proof assumes: the batches and the noise "
                "come from a 256-bit key drawn from the OS CSPRNG and never written"
            )
        return (
            f"SEEDED RUN: epsilon holds only while the seed key (id {self.seed_key_id}, "
            f"kept outside the run directory in ${SEED_KEY_ENV} or "
            "~/.config/scalemix/seed-key) stays secret; anyone holding it can recompute the "
            "batches and the noise"
        )

    def describe(self) -> dict:
        return {
            "mode": self.mode,
            "label": self.label,
            "seed_key_id": self.seed_key_id,
            "epsilon_assumes": self.assumption,
            "streams": {
                "init": "torch global generator, public --seed",
                "aug": "torch generator on the device, public --seed + 1",
                "sampler": "ChaCha20 keystream, secret run key",
                "noise": "ChaCha20 keystream, secret run key",
            },
        }

    def state_dict(self) -> dict:
        """Checkpoint state: draw counters and the public augmentation state, never a key."""
        return {
            "mode": self.mode,
            "seed_key_id": self.seed_key_id,
            "sampler": self.sampler.state_dict(),
            "noise": self.noise.state_dict(),
            "canary": self.canary.state_dict(),
            "aug": self.aug.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise ConfigError(
                f"the checkpoint was written in --noise {state.get('mode')} mode, not {self.mode}"
            )
        if self.mode in ("seeded", "public"):
            if state.get("seed_key_id") != self.seed_key_id:
                raise ConfigError(
                    f"this seeded run was started with seed key {state.get('seed_key_id')}, but "
                    f"the seed key here is {self.seed_key_id} ({seed_key_path()}); point "
                    f"${SEED_KEY_ENV} at the original key file to resume it"
                )
            self.sampler.load_state_dict(state["sampler"])
            self.noise.load_state_dict(state["noise"])
        # secure: the key is new, so its streams start fresh; nothing is ever replayed.
        aug = state["aug"]
        self.aug.set_state(aug.cpu() if hasattr(aug, "cpu") else aug)
