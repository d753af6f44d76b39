"""The device ChaCha20 kernel (privacy/chacha.py) against OpenSSL and RFC 8439, and the
secure noise and augmentation made through it against the host's, bit for bit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from scalemix.privacy import chacha, randomness
from scalemix.privacy.randomness import AugStream, SecretStream
from scalemix.privacy.sampling import NoiseSource

CPU = torch.device("cpu")


def test_block_function_matches_rfc8439_vector():
    # RFC 8439 section 2.3.2: key 00..1f, block counter 1, nonce 00:00:00:09:00:00:00:4a:00:00:00:00
    key = bytes(range(32))
    nonce = (1).to_bytes(4, "little") + bytes.fromhex("000000090000004a00000000")
    words = chacha.torch_keystream_words(key, nonce, 0, 16, CPU)
    expected = [
        0xE4E7F110, 0x15593BD1, 0x1FDD0F50, 0xC47120A3,
        0xC7F4D1C7, 0x0368C033, 0x9AAA2204, 0x4E6CD4C3,
        0x466482D2, 0x09AA9F07, 0x05D7C214, 0xA2028BD9,
        0xD19C12B5, 0xB94E16DE, 0xE883D0CB, 0x4E3C50A2,
    ]  # fmt: skip
    assert words.tolist() == expected


@pytest.mark.parametrize("first,count", [(0, 1), (0, 16), (5, 11), (15, 2), (17, 1000), (0, 5000)])
def test_kernel_matches_openssl_at_any_offset(first, count):
    key = os.urandom(32)
    for nonce in (bytes(16), (3).to_bytes(4, "little") + os.urandom(12)):
        ours = chacha.torch_keystream_words(key, nonce, first, count, CPU)
        ref = chacha.openssl_keystream_words(key, nonce, first, count)
        assert torch.equal(ours, ref)


def test_kernel_refuses_a_wrapping_block_counter():
    nonce = (2**32 - 2).to_bytes(4, "little") + bytes(12)
    chacha.torch_keystream_words(bytes(32), nonce, 0, 32, CPU)  # blocks 2^32-2, 2^32-1: fine
    with pytest.raises(ValueError, match="overflow"):
        chacha.torch_keystream_words(bytes(32), nonce, 0, 33, CPU)


def test_per_row_words_match_one_openssl_call_per_nonce():
    key = os.urandom(32)
    tails = torch.tensor([[7, 0, 0], [7, 123456, 0], [2**32 - 1, 2**32 - 1, 5]])
    out = chacha.per_row_words(key, tails, 40)  # 3 blocks a row, the last one cut
    for row, t in zip(out, tails.tolist()):
        nonce = b"".join(int(w).to_bytes(4, "little") for w in (0, *t))
        assert torch.equal(row, chacha.openssl_keystream_words(key, nonce, 0, 40))


def _draws(dtype=torch.float32):
    s = SecretStream(b"k" * 32, "noise")
    s.draws = 41
    return (
        s.normal(1001, CPU, dtype),
        s.uniform(333, CPU),
        s.normal(0, CPU),
        s.normal(3, CPU, dtype),
        s.draws,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_and_uniforms_from_the_kernel_are_the_hosts_bits(monkeypatch, dtype):
    host = _draws(dtype)
    monkeypatch.setattr(SecretStream, "device_kernel", True)
    monkeypatch.setattr(randomness, "DEVICE_NORMAL_BLOCK", 96)
    dev = _draws(dtype)
    assert host[-1] == dev[-1] == 45  # one draw each, empty ones included
    for a, b in zip(host[:-1], dev[:-1]):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_noise_source_adds_the_same_noise_through_either(monkeypatch):
    def noised():
        ts = [torch.zeros(3, 5), torch.zeros(700), torch.zeros(2, 2, 2)]
        NoiseSource(SecretStream(b"n" * 32, "noise")).add_(ts, std=0.7)
        return ts

    host = noised()
    monkeypatch.setattr(SecretStream, "device_kernel", True)
    monkeypatch.setattr(randomness, "DEVICE_NORMAL_BLOCK", 64)
    for a, b in zip(host, noised()):
        assert torch.equal(a, b)


def test_augmentation_words_from_the_kernel_are_the_hosts(monkeypatch):
    aug = AugStream(b"a" * 32)
    index = torch.tensor([0, 5, 17, 49_999, 2**33 + 3])
    host = aug.words(12, index, 16)
    host5 = aug.words(3, index, 5)  # 15 words: part of a block
    host_views = aug.views(12, index, 16, 4)
    monkeypatch.setattr(SecretStream, "device_kernel", True)
    assert torch.equal(aug.words(12, index, 16), host)
    assert torch.equal(aug.words(3, index, 5), host5)
    for a, b in zip(aug.views(12, index, 16, 4), host_views):
        assert torch.equal(a, b)
    assert aug.words(12, index[:0], 16).shape == (0, 16, 3)


def test_a_run_with_the_kernel_is_the_run_with_openssl(tiny_cfg, digits8, tmp_path, monkeypatch):
    """The whole step (Poisson sampler, augmentation offsets, noise) through the kernel, as
    on a GPU: the same model, bit for bit."""
    from scalemix.train import Trainer

    cfg = tiny_cfg.replace(epochs=0.1, aug="crop-flip", aug_mult=2)

    def run(out, **kw):
        t = Trainer(
            cfg.replace(out=str(out)), data=digits8, progress=False, log=lambda *_: None, **kw
        )
        t.run()
        return t

    host = run(tmp_path / "host")
    monkeypatch.setattr(SecretStream, "device_kernel", True)
    dev = run(tmp_path / "kernel", noise_nonce=host.rng.noise_nonce)
    assert dev.step == host.step >= 2
    for (n, a), (_, b) in zip(host.model.state_dict().items(), dev.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_a_bad_keystream_choice_is_a_usage_error_before_anything_is_written(
    cli, tmp_path, monkeypatch
):
    monkeypatch.setenv("SCALEMIX_CHACHA", "gpu")
    r = cli("train", "--out", tmp_path / "run", "--epochs", "0.05", "--image-size", "8")
    assert r.code == 2
    assert "SCALEMIX_CHACHA='gpu'" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "run").exists()


def test_config_records_where_the_keystream_is_made(tiny_cfg, digits8, monkeypatch):
    import json

    from scalemix.train import Trainer

    Trainer(tiny_cfg.replace(epochs=0.05), data=digits8, progress=False, log=lambda *_: None).run()
    resolved = json.loads((Path(tiny_cfg.out) / "config.json").read_text())["resolved"]
    assert resolved["keystream"] == "ChaCha20 on the host (OpenSSL)"
    monkeypatch.setenv("SCALEMIX_CHACHA", "device")
    assert "kernel on cpu" in SecretStream.source(CPU)


@pytest.mark.parametrize("kernel", [False, True])
def test_an_augmentation_step_outside_the_nonce_word_is_refused(monkeypatch, kernel):
    monkeypatch.setattr(SecretStream, "device_kernel", kernel)
    aug = AugStream(b"a" * 32)
    aug.words(2**32 - 1, torch.tensor([3]), 1)  # the last step the 32-bit word holds
    with pytest.raises(ValueError, match="2\\^32"):
        aug.words(2**32, torch.tensor([3]), 1)
