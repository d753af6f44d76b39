"""Download CIFAR-10 and ImageNette for users with a network.

The archive is streamed to a temporary file beside its destination, its MD5 checked,
and only then extracted (member paths are checked so that nothing lands outside the
destination). A half-finished download never looks like a data set. The URLs can be
pointed at a mirror with ``SCALEMIX_CIFAR10_URL`` / ``SCALEMIX_IMAGENETTE_URL`` (the tests
serve a small archive from 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.request
from pathlib import Path

from tqdm import tqdm

from scalemix.errors import DataError

SOURCES = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "env": "SCALEMIX_CIFAR10_URL",
        "check": "cifar-10-batches-py/test_batch",
    },
    "imagenette": {
        "url": "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
        "md5": "e793b78cc4c9e9a4ccc0c1155377a412",
        "env": "SCALEMIX_IMAGENETTE_URL",
        "check": "imagenette2-160/val",
    },
}


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_file(url: str, dest: Path, md5: str | None = None, timeout: float = 60.0) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", leave=False
            ) as bar:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"could not download {url}: {e}; check the network or download it by hand"
        ) from None
    if md5 is not None and (got := _md5(tmp)) != md5:
        tmp.unlink(missing_ok=True)
        raise DataError(f"download of {url} is corrupt (md5 {got}, expected {md5}); try again")
    os.replace(tmp, dest)
    return dest


def extract_tar(archive: Path, dest: Path) -> None:
    dest = dest.resolve()
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            target = (dest / m.name).resolve()
            if not target.is_relative_to(dest) or m.issym() or m.islnk():
                raise DataError(f"refusing to extract {m.name!r} from {archive}: unsafe path")
        tar.extractall(dest)


def ensure_downloaded(
    name: str, data_dir: str | Path, url: str | None = None, md5: str | None = "default"
) -> Path:
    """Download and extract ``name`` into ``data_dir`` unless it is already there."""
    src = SOURCES[name]
    root = Path(data_dir).expanduser()
    if (root / src["check"]).exists():
        return root
    url = url or os.environ.get(src["env"]) or src["url"]
    if md5 == "default":
        # A mirror set through the environment serves its own archive: its checksum is the
        # mirror's business, but we still refuse an archive without the expected layout.
        md5 = src["md5"] if url == src["url"] else None
    archive = root / Path(url).name
    if not archive.exists():
        download_file(url, archive, md5)
    extract_tar(archive, root)
    if not (root / src["check"]).exists():
        raise DataError(f"{archive} did not contain {src['check']}; is it the right archive?")
    archive.unlink()
    return root
