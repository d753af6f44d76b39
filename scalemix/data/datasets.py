"""Image data sets held in memory as uint8 tensors (N, C, H, W).

- ``digits``: the embedded offline default. The 1,797 real handwritten digits (8x8, from
  UCI) that ship inside scikit-learn, upsampled to 16x16; a fixed stratified split of
  1,438 train / 359 test (20 % of each class, rounded). No download, runs anywhere.
- ``cifar10``: the standard python layout (``cifar-10-batches-py/``, what torchvision
  reads), 50,000 train / 10,000 test; ``size`` below 32 area-downsamples every image.
- ``imagenette``: class folders of JPEGs (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``,
  the fast.ai imagenette2 layout), resized (shorter side) and centre-cropped to ``size``.

Images stay uint8 until a batch is taken; ``normalize`` turns a batch into float on the
device, with per-channel constants fixed in code (published values for CIFAR-10 and
ImageNet, [-1, 1] for digits): no statistic of the private training images is computed. Nothing here downloads unless asked (``download.py``).
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scalemix.choices import DATASETS
from scalemix.errors import DataError


@dataclass
class ImageData:
    name: str
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    source: str = ""  # where it was read from

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def resolution(self) -> int:
        return int(self.train_x.shape[-1])

    def to(self, device: torch.device) -> ImageData:
        for k in ("train_x", "train_y", "test_x", "test_y"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    def summary(self) -> dict:
        return {
            "name": self.name,
            "train_size": int(self.train_x.shape[0]),
            "test_size": int(self.test_x.shape[0]),
            "num_classes": self.num_classes,
            "shape": list(self.train_x.shape[1:]),
            "source": self.source,
        }


def normalize(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 batch -> float32, scaled to [0, 1] and standardised per channel."""
    x = x_uint8.float().div_(255.0)
    m, s = _constants(tuple(mean), tuple(std), x.device, x.dtype)
    return (x - m) / s


@functools.lru_cache(maxsize=16)
def _constants(mean: tuple, std: tuple, device: torch.device, dtype: torch.dtype):
    """The normalisation constants on the device, made once (a host-to-device copy per
    chunk would be a synchronisation per chunk on a GPU)."""
    m = torch.tensor(mean, device=device, dtype=dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device, dtype=dtype).view(1, -1, 1, 1)
    return m, s


# --------------------------------------------------------------------------- digits

# Normalisation constants are fixed in code, never computed from the (private) training
# images: preprocessing must not read private data (docs/sharp-edges.md, item 12). [0, 1] -> [-1, 1].
DIGITS_MEAN = (0.5,)
DIGITS_STD = (0.5,)


def load_digits(size: int = 16, test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's embedded handwritten digits, upsampled to ``size`` px."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    if size != 8:
        x = torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False
        )
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.from_numpy(d.target).long()
    # Fixed stratified split (seed 0): the same on every machine.
    g = torch.Generator().manual_seed(0)
    test_idx = []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[: round(len(idx) * test_fraction)])
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    test_mask[torch.cat(test_idx)] = True
    tr_x, tr_y, te_x, te_y = x[~test_mask], y[~test_mask], x[test_mask], y[test_mask]
    return ImageData(
        "digits", tr_x, tr_y, te_x, te_y, 10, DIGITS_MEAN, DIGITS_STD, source="sklearn.datasets"
    )


# --------------------------------------------------------------------------- CIFAR-10

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def find_cifar10_dir(data_dir: str | Path) -> Path:
    root = Path(data_dir).expanduser()
    for cand in (root, root / "cifar-10-batches-py"):
        if (cand / "data_batch_1").is_file() and (cand / "test_batch").is_file():
            return cand
    if not root.exists():
        raise DataError(
            f"data directory {str(root)!r} does not exist; point --data-dir at a folder holding "
            "cifar-10-batches-py/ or add --download"
        )
    raise DataError(
        f"no CIFAR-10 in {str(root)!r} (expected cifar-10-batches-py/data_batch_1..5 and "
        "test_batch); add --download to fetch it"
    )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="latin1")
        # The original release (Python 2) has str keys; Python 3 re-packs often have bytes keys.
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d["labels"], dtype=np.int64)
    except Exception as e:  # corrupt or foreign file
        raise DataError(f"could not read CIFAR-10 batch {path}: {e}") from None
    return x, y


def _downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images (N, C, H, W) to ``size`` px by area averaging, image by image (no
    statistic of the data set is read), in pieces to bound memory."""
    out = []
    for i in range(0, len(x), 5000):
        f = x[i : i + 5000].float()
        f = torch.nn.functional.interpolate(f, size=(size, size), mode="area")
        out.append(f.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else x


def load_cifar10(data_dir: str | Path, size: int | None = None) -> ImageData:
    """CIFAR-10 at 32 px, or area-downsampled to ``size`` px (e.g. 16 for CPU grids)."""
    d = find_cifar10_dir(data_dir)
    parts = [_read_cifar_batch(d / f"data_batch_{i}") for i in range(1, 6)]
    tx, ty = _read_cifar_batch(d / "test_batch")
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    tx = torch.from_numpy(tx)
    if size is not None and size != x.shape[-1]:
        if not 4 <= size <= x.shape[-1]:
            raise DataError(f"--image-size {size} for CIFAR-10 must lie in 4..32")
        x, tx = _downsample(x, size), _downsample(tx, size)
    return ImageData(
        "cifar10",
        x,
        y,
        tx,
        torch.from_numpy(ty),
        10,
        CIFAR10_MEAN,
        CIFAR10_STD,
        source=str(d),
    )


# --------------------------------------------------------------------------- ImageNette

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_image_folder(folder: Path, classes: list[str], size: int):
    from PIL import Image

    xs, ys = [], []
    for ci, c in enumerate(classes):
        files = sorted(
            p for p in (folder / c).iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png")
        )
        for p in files:
            with Image.open(p) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = size / min(w, h)
                im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
                xs.append(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
                ys.append(ci)
    if not xs:
        raise DataError(f"no images under {folder}")
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.long)


def load_imagenette(data_dir: str | Path, size: int = 160) -> ImageData:
    root = Path(data_dir).expanduser()
    for cand in (root, root / "imagenette2-160", root / "imagenette2-320", root / "imagenette2"):
        if (cand / "train").is_dir() and (cand / "val").is_dir():
            root = cand
            break
    else:
        raise DataError(
            f"no ImageNette in {str(root)!r} (expected train/<class>/*.JPEG and val/<class>/*.JPEG); "
            "add --download to fetch it"
        )
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"no class folders in {root / 'train'}")
    tr_x, tr_y = _load_image_folder(root / "train", classes, size)
    te_x, te_y = _load_image_folder(root / "val", classes, size)
    return ImageData(
        "imagenette",
        tr_x,
        tr_y,
        te_x,
        te_y,
        len(classes),
        IMAGENET_MEAN,
        IMAGENET_STD,
        source=str(root),
    )


def load_public_images(path: str | Path, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``count`` public images (uint8, N x C x H x W) from a ``.npy`` or ``.pt`` file.

    For ``--public-source FILE``: images from outside the private training set (another
    data set, a licensed public collection) whose statistics public-data BatchNorm may
    use without spending privacy. They must have the training images' shape.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(
            f"--public-source {str(p)!r} is not a file; give a .npy or .pt file of uint8 images "
            "shaped N x C x H x W, or 'split' to hold examples out of the training split"
        )
    try:
        x = torch.from_numpy(np.load(p)) if p.suffix == ".npy" else torch.load(p, weights_only=True)
    except Exception as e:
        raise DataError(f"cannot read public images from {p}: {e}") from None
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
        raise DataError(f"{p} must hold one uint8 array shaped N x C x H x W")
    if tuple(x.shape[1:]) != tuple(shape):
        raise DataError(
            f"public images in {p} are {tuple(x.shape[1:])}, the training images {tuple(shape)}; "
            "resize them to match"
        )
    if len(x) < count:
        raise DataError(f"{p} holds {len(x)} images; --public-size asks for {count}")
    return x[:count]


def load_data(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    size: int | None = None,
) -> ImageData:
    """Load a data set by name; ``download`` fetches CIFAR-10 / ImageNette when missing."""
    if name == "digits":
        return load_digits(size or 16)
    if name not in DATASETS or data_dir is None:
        check_available(name, data_dir, download)  # raises with the one message
    data_dir = Path(data_dir).expanduser()
    if download:
        from scalemix.data.download import ensure_downloaded

        ensure_downloaded(name, data_dir)
    if name == "cifar10":
        return load_cifar10(data_dir, size)
    return load_imagenette(data_dir, size or 160)


def check_available(name: str, data_dir: str | Path | None, download: bool = False) -> None:
    """Fail now, with load_data's message, if the data set cannot be found (before a
    command says that it started)."""
    if name == "digits":
        return
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if data_dir is None:
        raise DataError(f"--data {name} needs --data-dir DIR (add --download to fetch it there)")
    if name == "cifar10" and not download:
        find_cifar10_dir(data_dir)
    elif name == "imagenette" and not download and not Path(data_dir).expanduser().exists():
        raise DataError(
            f"data directory {str(data_dir)!r} does not exist; point --data-dir at ImageNette's "
            "train/ and val/ folders or add --download"
        )
