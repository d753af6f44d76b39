"""ChaCha20 (RFC 8439) keystream, on any device: the CPU through ``cryptography``
(OpenSSL), a GPU through torch integer operations, bit-identical.

The secure noise and the augmentation offsets are ChaCha20 keystream (privacy/randomness.py).
Made on the host, a ResNet-9 step's noise is ~15 MB of keystream copied to the device in
pieces, and the augmentation one cipher call per example; on a GPU the host then sits on
the step's critical path. ``torch_keystream_words`` and ``per_row_words`` make the same
words where they are used: on a CUDA device by the block function below, vectorised over
blocks (every block of a draw, or one block row per example, in one pass of ~760
element-wise kernels); on the CPU ``openssl`` makes them, faster there.
``tests/test_chacha.py`` checks the torch kernel against OpenSSL word for word, at
block-counter offsets and per-row nonces, and that the noise and the augmentation made
through either are the same bits.

Words are carried as int64 tensors holding values in [0, 2^32): every sum is masked back
to 32 bits, so the arithmetic is exact on any device (no reliance on int32 wrap-around,
and right shifts are logical).
"""

from __future__ import annotations

import torch

_M = 0xFFFFFFFF
_CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"
WORDS_PER_BLOCK = 16


def key_words(key: bytes) -> list[int]:
    """The 32-byte key as eight little-endian 32-bit words."""
    if len(key) != 32:
        raise ValueError(f"a ChaCha20 key has 32 bytes, got {len(key)}")
    return [int.from_bytes(key[4 * i : 4 * i + 4], "little") for i in range(8)]


def nonce_words(nonce: bytes) -> list[int]:
    """A 16-byte nonce as ``cryptography`` takes it (4-byte block counter, then 12 bytes)
    as four little-endian words: state words 12 to 15."""
    if len(nonce) != 16:
        raise ValueError(f"a ChaCha20 nonce (with its counter) has 16 bytes, got {len(nonce)}")
    return [int.from_bytes(nonce[4 * i : 4 * i + 4], "little") for i in range(4)]


def _rotl(x: torch.Tensor, n: int) -> torch.Tensor:
    return ((x << n) & _M) | (x >> (32 - n))


def _quarter(a, b, c, d) -> None:
    """The quarter round on four rows of words, in place (each row: any shape)."""
    a.add_(b).bitwise_and_(_M)
    d.copy_(_rotl(d ^ a, 16))
    c.add_(d).bitwise_and_(_M)
    b.copy_(_rotl(b ^ c, 12))
    a.add_(b).bitwise_and_(_M)
    d.copy_(_rotl(d ^ a, 8))
    c.add_(d).bitwise_and_(_M)
    b.copy_(_rotl(b ^ c, 7))


def block_words(key: bytes, state_tail: torch.Tensor) -> torch.Tensor:
    """The ChaCha20 block function for many blocks at once.

    ``state_tail`` is an (n, 4) int64 tensor of state words 12..15 (block counter and
    nonce) per block, on the device that computes; returns (n, 16) keystream words."""
    n = state_tail.shape[0]
    dev = state_tail.device
    head = torch.tensor([*_CONSTANTS, *key_words(key)], dtype=torch.int64, device=dev)
    init = torch.cat([head.expand(n, 12), state_tail.to(torch.int64)], dim=1)  # (n, 16)
    x = init.t().reshape(4, 4, n).clone()  # rows a, b, c, d; each (4 columns, n)
    a, b, c, d = x[0], x[1], x[2], x[3]
    for _ in range(10):
        _quarter(a, b, c, d)  # the column round
        # the diagonal round: row r shifted left by r lines diagonals up as columns
        b2, c2, d2 = b.roll(-1, 0), c.roll(-2, 0), d.roll(-3, 0)
        _quarter(a, b2, c2, d2)
        b.copy_(b2.roll(1, 0))
        c.copy_(c2.roll(2, 0))
        d.copy_(d2.roll(3, 0))
    return (x.reshape(16, n).t() + init) & _M


def torch_keystream_words(
    key: bytes, nonce: bytes, first_word: int, n_words: int, device: torch.device
) -> torch.Tensor:
    """Words ``first_word .. first_word + n_words`` of the keystream for ``nonce`` (its
    counter word included, as ``cryptography`` takes it), computed on ``device``."""
    if n_words == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    c0, *rest = nonce_words(nonce)
    first_block = first_word // WORDS_PER_BLOCK
    last_block = (first_word + n_words - 1) // WORDS_PER_BLOCK
    if c0 + last_block > _M:  # OpenSSL refuses it too: the 32-bit counter would wrap
        raise ValueError("ChaCha20's 32-bit block counter would overflow for this nonce")
    counters = torch.arange(first_block, last_block + 1, dtype=torch.int64, device=device) + c0
    tail = torch.stack([counters, *(torch.full_like(counters, w) for w in rest)], dim=1)
    words = block_words(key, tail).reshape(-1)
    skip = first_word - first_block * WORDS_PER_BLOCK
    return words[skip : skip + n_words]


def openssl(key: bytes, nonce: bytes):
    """OpenSSL's ChaCha20 keystream for ``nonce`` (via ``cryptography``), on the host:
    read it with ``.update(bytes(n))``."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()


def openssl_keystream_words(
    key: bytes, nonce: bytes, first_word: int, n_words: int
) -> torch.Tensor:
    """The same words as ``torch_keystream_words``, from OpenSSL, on the CPU."""
    enc = openssl(key, nonce)
    if first_word:
        enc.update(bytes(4 * first_word))
    raw = enc.update(bytes(4 * n_words))
    if not raw:
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(bytearray(raw), dtype=torch.int32).to(torch.int64) & _M


def per_row_words(key: bytes, tails: torch.Tensor, n_words: int) -> torch.Tensor:
    """For each row of ``tails`` ((n, 3) int64: state words 13..15, the block counter
    starting at 0), the first ``n_words`` keystream words: (n, n_words), on ``tails``'s
    device, all rows in one pass (the augmentation stream's one nonce per example)."""
    n = tails.shape[0]
    blocks = -(-n_words // WORDS_PER_BLOCK)
    if n == 0 or n_words == 0:
        return torch.zeros(n, n_words, dtype=torch.int64, device=tails.device)
    counters = torch.arange(blocks, dtype=torch.int64, device=tails.device)
    state = torch.cat(
        [
            counters.view(1, blocks, 1).expand(n, blocks, 1),
            tails.to(torch.int64).view(n, 1, 3).expand(n, blocks, 3),
        ],
        dim=2,
    ).reshape(n * blocks, 4)
    return block_words(key, state).view(n, blocks * WORDS_PER_BLOCK)[:, :n_words]
