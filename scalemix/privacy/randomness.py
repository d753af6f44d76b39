"""The randomness model: one place that owns every random stream of a run.

DP-SGD's epsilon holds only if the randomness its proof relies on -- which examples each
Poisson batch drew, how each was augmented, and the Gaussian noise -- is secret from the
attacker, who reads everything a run writes, and everything every other run of its grid
writes (docs/sharp-edges.md, "The randomness model" and "Randomness across runs"):

=========  ===========================================  ================================
stream     what it drives                               source
=========  ===========================================  ================================
init       model initialisation                         torch, the public ``--seed``
aug        crops and flips, per (step, example index)   ChaCha20 under the run key
sampler    Poisson batch selection                      ChaCha20 under the run key
canary     audit canaries: coins, picks, label shifts   ChaCha20 under the run key
noise      the Gaussian noise of every step             ChaCha20 under the noise key
=========  ===========================================  ================================

Keys are 256 bits. Each secret stream is a ChaCha20 keystream (a cryptographic generator)
under its own subkey ``HMAC-SHA256(key, stream name)``, so no stream predicts another;
each draw (one step) uses its own nonce, so a stream's state is a draw counter that a
checkpoint can hold without holding the key. Augmentation takes its nonce from (step,
example index), so an example's views never depend on which other examples were drawn.

Where the keys come from is the *noise mode*:

- ``secure`` (the default of ``scalemix train``): 32 bytes from the operating system's
  CSPRNG (``os.urandom``), held in memory only and never written anywhere; the noise key
  is the run key. Not reproducible; a resumed run draws a fresh key.
- ``public`` (non-private runs only): ``SHA-256("scalemix/public/v1/<seed>")``; nothing
  is protected, so batches are reproducible from ``--seed`` alone.
- ``seeded`` (research reproducibility; the default inside ablation grids): the run key
  is ``HMAC-SHA256(seed key, "scalemix/seeded/v1/<seed>")``, shared by every run of one
  seed (the same batches, augmentations and canaries: common random numbers for paired
  comparisons), and the noise key is ``HMAC-SHA256(seed key,
  "scalemix/seeded/v2/noise/<seed>/<identity>/<nonce>")`` with the run's identity (a hash
  of its configuration) and a fresh 128-bit nonce per run (public, in ``config.json``), so
  two runs never share a noise draw: two releases with one noise draw would cancel it,
  and two runs of one configuration need not compute the same thing (threads, engine
  plans, devices and versions change the arithmetic). Reproducing a run's noise is an
  explicit request (``--noise-nonce``), and then only one of the two may be published. The grid's joint epsilon (``privacy/grid.py``) accounts for
  the shared batches. The *seed key* is a 256-bit secret kept in a file outside every run
  directory (``$SCALEMIX_SEED_KEY``, or ``~/.config/scalemix/seed-key``, created on first
  use with mode 0600, refused when others can read it); runs record only its fingerprint
  (``seed_key_id``). epsilon then assumes that the seed key stays secret, and every output
  that shows epsilon says so.
- ``seeded-shared``: as ``seeded``, but the runs of one seed share their noise too
  (maximal common random numbers). Each run alone is (epsilon, delta)-DP; any two runs of
  one seed together are not DP, and every output says so.

Gaussian noise is made from the keystream by the Box--Muller transform (96-bit uniforms
for the radius, 32-bit for the angle, in float64 on the run's device), pair by pair, so
that the first k normals of a draw do not depend on how many follow. The radius stops at
``RADIUS_MAX`` = 11.5; ``tail_delta`` bounds the delta that adds. Floating-point side
channels (Mironov 2012) are not mitigated.
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
from scalemix.privacy import chacha

SECRET_STREAMS = ("sampler", "noise")
KEY_BYTES = 32
SEED_KEY_ENV = "SCALEMIX_SEED_KEY"
_SEEDED_CONTEXT = b"scalemix/seeded/v1/"
_NOISE_CONTEXT = b"scalemix/seeded/v2/noise/"
NORMAL_BLOCK = 2**15  # Box--Muller pairs computed at once (256 KB of float32 noise)
DEVICE_NORMAL_BLOCK = 2**20  # the same where the device makes the keystream (few launches)
PAIR_BYTES = 16  # keystream bytes per Box--Muller pair: 96-bit radius, 32-bit angle
RADIUS_MAX = math.sqrt(2 * 96 * math.log(2))  # the largest radius a 96-bit uniform gives
_MASK53 = (1 << 53) - 1


def tail_delta(epsilon: float, steps: int, normals_per_step: int) -> float:
    """The delta that the noise's truncated tails add, at most.

    Box--Muller from a 96-bit uniform never gives a radius above ``RADIUS_MAX``: a pair of
    normals differs from an exact Gaussian pair only on an event of probability 2^-96. Over
    all pairs of all steps the released noise is within total variation
    ``tv = steps * pairs * 2^-96`` of exact Gaussian noise, so an (epsilon, delta) bound
    for exact noise gives (epsilon, delta + (1 + e^epsilon) tv) for the noise we draw."""
    pairs = (normals_per_step + 1) // 2
    tv = steps * pairs * 2.0**-96
    return min(1.0, (1.0 + math.exp(min(epsilon, 700.0))) * tv)


# --------------------------------------------------------------------------- the seed key


def seed_key_path() -> Path:
    """Where the seed key of seeded mode lives (never inside a run directory)."""
    env = os.environ.get(SEED_KEY_ENV)
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "scalemix" / "seed-key"


def load_seed_key(create: bool = True, *, run_dir: str | Path | None = None) -> bytes:
    """Read the 256-bit seed key; create it when missing.

    Creation is race-free: the key is written to a private temporary file and linked into
    place, so a worker never reads a half-written key while another creates it. A key that
    others may read, or one inside the run directory that a run publishes, is refused:
    seeded epsilon holds only while the key stays secret (docs/sharp-edges.md, "The
    randomness model")."""
    path = seed_key_path()
    if run_dir is not None:
        out, where = Path(run_dir).resolve(), path.resolve()
        if where == out or out in where.parents:
            raise ConfigError(
                f"the seed key {path} lies inside the run directory {run_dir}, which a run "
                f"publishes; keep it outside (point ${SEED_KEY_ENV} elsewhere)"
            )
    if not path.exists():
        if not create:
            raise ConfigError(f"no seed key at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(os.urandom(KEY_BYTES).hex() + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # atomic: appears whole, or not at all
            except FileExistsError:  # another worker of the same grid made it first
                pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise ConfigError(f"cannot read the seed key {path} ({e})") from None
    if mode & 0o077:
        raise ConfigError(
            f"the seed key {path} can be read by other users (mode {oct(mode & 0o777)}); "
            f"run 'chmod 600 {path}' (anyone holding it can recompute seeded runs' batches "
            "and noise)"
        )
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

    # Where the keystream is made (privacy/chacha.py): by OpenSSL on the host for the CPU,
    # by the torch ChaCha20 kernel on the device for a GPU (no keystream crosses the bus,
    # nothing waits for the host). The same words either way; tests force the kernel on
    # the CPU (``device_kernel = True``) to check it; ``SCALEMIX_CHACHA=host`` keeps a GPU
    # run's keystream on the host (OpenSSL, pinned non-blocking copies), ``device`` forces
    # the kernel.
    device_kernel: bool | None = None  # None: $SCALEMIX_CHACHA, else the kernel off the CPU

    @classmethod
    def on_device(cls, device: torch.device) -> bool:
        if cls.device_kernel is not None:
            return cls.device_kernel
        choice = os.environ.get("SCALEMIX_CHACHA", "auto")
        if choice not in ("auto", "host", "device"):
            raise ConfigError(f"SCALEMIX_CHACHA={choice!r}: use auto (the default), host or device")
        return choice == "device" or (choice == "auto" and device.type != "cpu")

    @classmethod
    def source(cls, device: torch.device) -> str:
        """Where a run on ``device`` makes its keystream (config.json records it)."""
        if cls.on_device(device):
            return f"ChaCha20 kernel on {device.type} (privacy/chacha.py)"
        return "ChaCha20 on the host (OpenSSL)"

    def _next_nonce(self) -> bytes:
        """The next draw's nonce, as ``cryptography`` takes it: a 4-byte block counter (0)
        then the 12-byte draw count. Every draw takes one, used or not."""
        nonce = (0).to_bytes(4, "little") + self.draws.to_bytes(12, "little")
        self.draws += 1
        return nonce

    def _draw(self, device: torch.device):
        """The next draw: a reader ``(first_word, n_words) -> int64 words in [0, 2^32)`` on
        ``device``, read in order from word 0 (ChaCha20 block counter from 0)."""
        nonce = self._next_nonce()
        if self.on_device(device):
            return lambda first, n: chacha.torch_keystream_words(self._key, nonce, first, n, device)
        enc = chacha.openssl(self._key, nonce)
        read = [0]

        def words(first: int, n: int) -> torch.Tensor:
            assert first == read[0], "an OpenSSL draw is read in order"
            read[0] += n
            raw = self._to_tensor(enc.update(bytes(4 * n)), device)
            return raw.view(torch.int32).to(torch.int64) & 0xFFFFFFFF

        return words

    def random_bytes(self, n: int) -> bytes:
        """The next draw: ``n`` bytes of keystream (on the host)."""
        return chacha.openssl(self._key, self._next_nonce()).update(bytes(n))

    @staticmethod
    def _to_tensor(raw: bytes, device: torch.device) -> torch.Tensor:
        """Host keystream bytes on the device (pinned and non-blocking to a GPU; used when
        the kernel is switched off there)."""
        t = (
            torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            if raw
            else torch.zeros(0, dtype=torch.uint8)
        )
        if device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)

    def uniform(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``n`` float64 uniforms in [0, 1) with 53 random bits each (one draw): the top 53
        bits of each little-endian 64-bit keystream word pair."""
        device = torch.device(device)
        read = self._draw(device)
        if n == 0:
            return torch.zeros(0, dtype=torch.float64, device=device)
        w = read(0, 2 * n).view(n, 2)
        bits = (w[:, 1] << 21) | (w[:, 0] >> 11)
        return bits.to(torch.float64).mul_(2.0**-53)

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
        (``DEVICE_NORMAL_BLOCK`` where the device makes the keystream; the draw is taken
        now; the pieces are made as they are read). Every normal depends on its own pair's
        keystream only, so the draw is the same whoever reads it, in whatever pieces,
        ``normal`` included: a model's worth of noise never needs more than one piece's
        working memory."""
        device = torch.device(device)
        block = DEVICE_NORMAL_BLOCK if self.on_device(device) else NORMAL_BLOCK
        return self._normal_pieces(self._draw(device), (n + 1) // 2, n, dtype, block)

    @staticmethod
    def _normal_pieces(read, half: int, n: int, dtype, block: int):
        # 16 bytes per pair, pair by pair, so the first k normals of a draw do not depend
        # on how many follow (a run with an audit vector appended keeps the model's noise).
        math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for start in range(0, half, block):
            pairs = min(block, half - start)
            # four little-endian 32-bit words a pair: the radius's 96 bits (low, high,
            # extension) and the angle's 32 (read as a signed word)
            words = read(4 * start, 4 * pairs).view(pairs, 4)
            low, high, ext, a_bits = words.unbind(1)
            # u1 = (hi64 + (ext + 1) / 2^32) / 2^64 in (0, 1]: float64 keeps the small values
            # exactly, so the radius reaches sqrt(2 ln 2^96) = 11.5 (see RADIUS_MAX)
            u1 = (high.to(torch.float64) * 2.0**32).add_(low.to(torch.float64))
            u1.add_(ext.to(torch.float64).add_(1.0).mul_(2.0**-32)).mul_(2.0**-64)
            u1.clamp_(max=1.0)
            a_bits = a_bits - ((a_bits >> 31) << 32)  # the word as a signed 32-bit integer
            # The radius carries the tails: float64 log of the 96-bit uniform; the angle
            # needs only the output precision.
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
    """Every random stream of one run, and the statement of what epsilon assumes.

    ``identity`` names the run (a hash of its resolved configuration, without the output
    directory): a seeded run's noise is keyed by it, so two different runs never share a
    noise draw (docs/sharp-edges.md, "Randomness across runs")."""

    def __init__(
        self,
        mode: str,
        seed: int,
        device: torch.device | str = "cpu",
        rank: int = 0,
        *,
        identity: str = "",
        run_dir: str | Path | None = None,
        noise_nonce: str | None = None,
    ):
        if mode not in (*NOISE_MODES, "public"):
            raise ConfigError(f"--noise {mode!r} is not one of: {', '.join(NOISE_MODES)}")
        self.mode, self.seed, self.device = mode, int(seed), torch.device(device)
        self.identity = identity
        self.seed_key_id = None
        self.noise_nonce = None
        if mode == "secure":
            run_key = noise_key = os.urandom(KEY_BYTES)  # never written anywhere
        elif mode == "public":  # non-private runs: nothing to hide, reproducible from --seed
            run_key = hashlib.sha256(b"scalemix/public/v1/" + str(self.seed).encode()).digest()
            noise_key = run_key
        else:
            seed_key = load_seed_key(run_dir=run_dir)
            self.seed_key_id = key_id(seed_key)
            # batches, augmentation and canaries: shared by every run of this seed (common
            # random numbers); the grid's joint epsilon accounts for the shared batches
            run_key = hmac.new(
                seed_key, _SEEDED_CONTEXT + str(self.seed).encode(), hashlib.sha256
            ).digest()
            if mode == "seeded":  # the noise is this run's own
                if not identity:
                    raise ValueError("a seeded run needs its identity to key its noise")
                # a fresh public nonce per run: two runs share noise only when one is told
                # to reproduce the other (noise_nonce given); "" is a run from before nonces
                self.noise_nonce = os.urandom(16).hex() if noise_nonce is None else noise_nonce
                name = f"{self.seed}/{identity}" + (
                    f"/{self.noise_nonce}" if self.noise_nonce else ""
                )
                noise_key = hmac.new(
                    seed_key, _NOISE_CONTEXT + name.encode(), hashlib.sha256
                ).digest()
            else:  # seeded-shared: the runs of one seed share their noise too
                noise_key = run_key
            del seed_key
        # data-parallel rank r > 0 (train/distributed.py): its own sampler and noise share,
        # independent of every other rank's; rank 0 is the single-process run
        suffix = f"/rank{rank}" if rank else ""
        self.sampler = SecretStream(run_key, "sampler" + suffix)
        self.noise = SecretStream(noise_key, "noise" + suffix)
        self.canary = SecretStream(run_key, "canary")  # audit canaries: coins, coordinates
        # augmentation: keyed per (step, example), secret like the batches
        self.aug = AugStream(run_key)
        del run_key, noise_key

    def init_model_rng(self) -> None:
        """Seed torch's global generator for model initialisation (public)."""
        torch.manual_seed(self.seed)

    @property
    def label(self) -> str:
        if self.mode == "public":
            return "public (non-private run: batches reproducible from --seed)"
        if self.mode == "secure":
            return "secure (sampling and noise from a 256-bit OS-entropy key, never written)"
        if self.mode == "seeded-shared":
            return (
                f"seeded-shared (reproducible; sampling and noise keyed by seed key "
                f"{self.seed_key_id}; the runs of one seed SHARE their noise)"
            )
        return (
            f"seeded (sampling keyed by seed key {self.seed_key_id}, shared by the runs of "
            "a seed; noise by the seed key, this run's configuration and its own nonce: "
            "reproducible with --noise-nonce, never shared by two runs)"
        )

    @property
    def assumption(self) -> str:
        """The sentence every output that shows epsilon carries."""
        if self.mode == "public":
            return "non-private run: no epsilon"
        if self.mode == "secure":
            return (
                "epsilon assumes only what DP-SGD's proof assumes: the batches, augmentations "
                "and noise come from a 256-bit key drawn from the OS CSPRNG and never written"
            )
        text = (
            f"SEEDED RUN: epsilon holds only while the seed key (id {self.seed_key_id}, "
            f"kept outside the run directory in ${SEED_KEY_ENV} or "
            "~/.config/scalemix/seed-key) stays secret; anyone holding it can recompute the "
            "batches, augmentations and noise. Runs of one seed share their batches: "
            "together they are covered by their grid's joint epsilon, not by this one"
        )
        if self.mode == "seeded-shared":
            text += (
                ". The runs of one seed also share their NOISE (--noise seeded-shared): each "
                "run alone is (epsilon, delta)-DP, but two of them together are not DP at all"
            )
        return text

    def describe(self) -> dict:
        secret = "secret run key" if self.mode == "secure" else "secret seed key and --seed"
        return {
            "mode": self.mode,
            "label": self.label,
            "seed_key_id": self.seed_key_id,
            "epsilon_assumes": self.assumption,
            "run_identity": self.identity or None,
            "noise_nonce": self.noise_nonce,
            "streams": {
                "init": "torch global generator, public --seed",
                "aug": f"ChaCha20 keystream per (step, example index), {secret}",
                "sampler": f"ChaCha20 keystream, {secret}",
                "canary": f"ChaCha20 keystream, {secret}",
                "noise": "ChaCha20 keystream, "
                + {
                    "secure": "secret run key",
                    "seeded": "secret seed key, --seed, this run's configuration and its nonce",
                    "seeded-shared": "secret seed key and --seed (shared by the runs of a seed)",
                    "public": "public --seed",
                }[self.mode],
            },
        }

    def state_dict(self) -> dict:
        """Checkpoint state: draw counters, never a key (augmentation is keyed per step
        and example, so it has no state)."""
        return {
            "mode": self.mode,
            "seed_key_id": self.seed_key_id,
            "noise_nonce": self.noise_nonce,
            "sampler": self.sampler.state_dict(),
            "noise": self.noise.state_dict(),
            "canary": self.canary.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise ConfigError(
                f"the checkpoint was written in --noise {state.get('mode')} mode, not {self.mode}"
            )
        if self.mode != "secure":
            if state.get("seed_key_id") != self.seed_key_id:
                raise ConfigError(
                    f"this seeded run was started with seed key {state.get('seed_key_id')}, but "
                    f"the seed key here is {self.seed_key_id} ({seed_key_path()}); point "
                    f"${SEED_KEY_ENV} at the original key file to resume it"
                )
            self.sampler.load_state_dict(state["sampler"])
            self.noise.load_state_dict(state["noise"])
            self.canary.load_state_dict(state["canary"])
        # secure: the key is new, so its streams start fresh; nothing is ever replayed.


# --------------------------------------------------------------------------- augmentation


class AugStream:
    """Secret augmentation randomness keyed per (step, example index).

    Example i's K views at step t come from the ChaCha20 keystream under
    ``HMAC-SHA256(key, "aug")`` with nonce (t, i): they do not depend on which other
    examples the step drew, nor on their order, so adding or removing one example leaves
    every other example's views unchanged and the clipped sum's sensitivity stays C
    (docs/sharp-edges.md, item 3). Stateless: nothing to checkpoint, nothing replayed."""

    WORD_BYTES = 12  # three 32-bit words a view: vertical shift, horizontal shift, flip

    def __init__(self, key: bytes):
        self._key = hmac.new(key, b"scalemix/stream/aug", hashlib.sha256).digest()

    def words(self, step: int, index: torch.Tensor, k: int) -> torch.Tensor:
        """(B, K, 3) uniform 32-bit words (as int64 in [0, 2^32)) for the examples ``index``
        at ``step``, on ``index``'s device: there by the ChaCha20 kernel, all examples in
        one pass, where ``SecretStream.on_device`` says so; else one OpenSSL call each."""
        n_words = self.WORD_BYTES // 4 * k
        if not 0 <= int(step) < 2**32:  # the nonce's 32-bit step word (OpenSSL refuses too)
            raise ValueError(f"an augmentation step must be in [0, 2^32), got {step}")
        if SecretStream.on_device(index.device):  # (indices come from the sampler: >= 0)
            i = index.to(torch.int64)
            tails = torch.stack([torch.full_like(i, int(step)), i & 0xFFFFFFFF, i >> 32], dim=1)
            return chacha.per_row_words(self._key, tails, n_words).reshape(len(index), k, 3)
        zeros = bytes(4 * n_words)
        head = (0).to_bytes(4, "little") + int(step).to_bytes(4, "little")
        raw = b"".join(
            chacha.openssl(self._key, head + int(i).to_bytes(8, "little")).update(zeros)
            for i in index.tolist()
        )
        w = (
            torch.frombuffer(bytearray(raw), dtype=torch.int32)
            if raw
            else torch.zeros(0, dtype=torch.int32)
        )
        return (w.to(torch.int64) & 0xFFFFFFFF).view(len(index), k, 3).to(index.device)

    def views(self, step: int, index: torch.Tensor, k: int, pad: int):
        """Crop offsets ``dy, dx`` in [0, 2 pad] and ``flip`` (bool), each (B * K,), for
        the examples ``index`` at ``step``. Offsets are a 32-bit word modulo 2 pad + 1
        (bias below 2^-28)."""
        w = self.words(step, index, k).reshape(-1, 3)
        return w[:, 0] % (2 * pad + 1), w[:, 1] % (2 * pad + 1), (w[:, 2] & 1).bool()
