"""Data loading: embedded digits, CIFAR-10 and ImageNette layouts, download against a
local server, and the batched augmentation."""

from __future__ import annotations

import hashlib
import http.server
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scalemix.data import augment, load_data
from scalemix.data.download import ensure_downloaded
from scalemix.errors import DataError


def test_digits_is_real_and_fixed():
    d = load_data("digits")
    assert d.train_x.dtype == torch.uint8 and tuple(d.train_x.shape[1:]) == (1, 16, 16)
    assert len(d.train_y) + len(d.test_y) == 1797
    assert (len(d.train_y), len(d.test_y)) == (1438, 359)  # as README.md and the docstring say
    assert set(d.test_y.tolist()) == set(range(10))
    again = load_data("digits")
    assert torch.equal(d.test_x, again.test_x)


def _write_fake_cifar(root: Path, n_per_batch: int = 20) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        # str keys like the original release; bytes keys like Python 3 re-packs
        data, labels = ("data", "labels") if name != "data_batch_2" else (b"data", b"labels")
        batch = {
            data: rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            labels: rng.integers(0, 10, n_per_batch).tolist(),
        }
        with open(d / name, "wb") as fh:
            pickle.dump(batch, fh)
    return d


def test_cifar10_layout(tmp_path):
    _write_fake_cifar(tmp_path)
    d = load_data("cifar10", tmp_path)
    assert tuple(d.train_x.shape) == (100, 3, 32, 32) and tuple(d.test_x.shape) == (20, 3, 32, 32)
    # also accepts the cifar-10-batches-py folder itself
    assert load_data("cifar10", tmp_path / "cifar-10-batches-py").train_x.shape[0] == 100


def test_cifar10_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data("cifar10", tmp_path / "nope")
    with pytest.raises(DataError, match="--download"):
        load_data("cifar10", tmp_path)
    d = _write_fake_cifar(tmp_path)
    (d / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        load_data("cifar10", tmp_path)


def test_imagenette_layout(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("n01440764", "n02102040"):
            folder = tmp_path / split / c
            folder.mkdir(parents=True)
            for i in range(3):
                arr = rng.integers(0, 256, (40 + 10 * i, 50, 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / f"img{i}.JPEG")
    d = load_data("imagenette", tmp_path, size=24)
    assert tuple(d.train_x.shape) == (6, 3, 24, 24) and d.num_classes == 2
    assert sorted(d.train_y.tolist()) == [0, 0, 0, 1, 1, 1]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def local_server(tmp_path):
    serve = tmp_path / "serve"
    serve.mkdir()
    handler = lambda *a, **kw: _Quiet(*a, directory=str(serve), **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield serve, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_cifar10_from_local_server(tmp_path, local_server):
    serve, base = local_server
    src = _write_fake_cifar(tmp_path / "src")
    archive = serve / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    dest = tmp_path / "data"
    ensure_downloaded("cifar10", dest, url=f"{base}/cifar-10-python.tar.gz", md5=md5)
    assert load_data("cifar10", dest).train_x.shape[0] == 100
    assert not list(dest.glob("*.tar.gz")) and not list(dest.glob("*.part"))


def test_download_with_bad_checksum_leaves_nothing(tmp_path, local_server):
    serve, base = local_server
    (serve / "cifar-10-python.tar.gz").write_bytes(b"garbage")
    dest = tmp_path / "data"
    with pytest.raises(DataError, match="corrupt"):
        ensure_downloaded("cifar10", dest, url=f"{base}/cifar-10-python.tar.gz", md5="0" * 32)
    assert not (dest / "cifar-10-batches-py").exists()
    assert not list(dest.glob("*")) or not any(p.suffix == ".part" for p in dest.iterdir())


def test_download_unreachable_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="could not download"):
        ensure_downloaded("cifar10", tmp_path, url="http://127.0.0.1:9/none.tar.gz", md5=None)


def test_augment_views_are_crops_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 8, 8)
    views = augment(x, 5, torch.Generator().manual_seed(1), "crop-flip", pad=2)
    assert views.shape == (3, 5, 2, 8, 8)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    flips = 0
    for b in range(3):
        for k in range(5):
            v = views[b, k]
            found = False
            for dy in range(5):
                for dx in range(5):
                    crop = padded[b, :, dy : dy + 8, dx : dx + 8]
                    if torch.equal(v, crop):
                        found = True
                    elif torch.equal(v, crop.flip(-1)):
                        found, flips = True, flips + 1
            assert found
    assert 0 < flips < 15  # both flipped and unflipped views occur
    # the K views of one example differ
    assert not torch.equal(views[0, 0], views[0, 1]) or not torch.equal(views[0, 1], views[0, 2])


def test_augment_none_repeats_the_image():
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(augment(x, 3, None, "none")[:, 2], x)


def test_crop_mode_translates_without_mirroring():
    import torch.nn.functional as F

    from scalemix.data.augment import augment

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)  # no symmetry
    out = augment(x, 5, torch.Generator().manual_seed(0), "crop", pad=2)
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(2):
        for v in range(5):
            crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
            assert any(torch.equal(out[i, v], c) for c in crops)


def test_cifar10_downsampled_by_area_per_image(tmp_path):
    root = _write_fake_cifar(tmp_path)
    full = load_data("cifar10", root)
    small = load_data("cifar10", root, size=16)
    assert tuple(small.train_x.shape[1:]) == (3, 16, 16) and small.train_x.dtype == torch.uint8
    assert len(small.test_y) == len(full.test_y)
    # each pixel is the rounded mean of a 2x2 block of the original
    want = full.test_x.float().unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2)).round()
    assert torch.equal(small.test_x, want.to(torch.uint8))
    with pytest.raises(DataError, match="4..32"):
        load_data("cifar10", root, size=64)


def test_missing_data_is_reported_before_anything_starts(tmp_path):
    from scalemix.data.datasets import check_available

    with pytest.raises(DataError, match="needs --data-dir"):
        check_available("cifar10", None)
    with pytest.raises(DataError, match="does not exist"):
        check_available("cifar10", tmp_path / "nowhere")
    check_available("digits", None)
    check_available("cifar10", _write_fake_cifar(tmp_path))
