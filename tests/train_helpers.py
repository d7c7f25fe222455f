"""Helpers shared by the training-data and training-loop tests: shard builders (real images, real tar
files) and the one-thread fixture."""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "src" / "dinorankclip" / "sample_data"


def _root_conftest():
    # Loaded by path: with several conftest.py files in the tree, ``import conftest`` may find another one.
    spec = importlib.util.spec_from_file_location("_tests_root_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_OVERRIDES: list[str] = list(_root_conftest().TINY_OVERRIDES)

IMAGES = sorted((SAMPLE_DATA / "flickr8k" / "images").glob("*.jpg"))


def image_bytes(i: int) -> bytes:
    return IMAGES[i % len(IMAGES)].read_bytes()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Write ``(name, data)`` members in order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))


def write_good_shard(path: Path, start: int, count: int, prefix: str = "k") -> list[str]:
    """A shard of ``count`` readable samples (jpg, txt, json); returns the keys."""
    members, keys = [], []
    for i in range(start, start + count):
        key = f"{prefix}{i:05d}"
        keys.append(key)
        members += [(f"{key}.jpg", image_bytes(i)), (f"{key}.txt", f"a photo number {i}".encode()),
                    (f"{key}.json", b'{"caption": "json caption %d"}' % i)]
    write_tar(path, members)
    return keys


# Sample number -> kind of the bad member in the 20-sample shard of write_bad_shard.
BAD_MEMBERS = {3: "decode_error", 7: "empty_image", 11: "caption_not_utf8", 14: "duplicate_key",
               17: "missing_caption", 19: "truncated_tar"}


def write_bad_shard(path: Path) -> list[str]:
    """Write 20 samples of which six are bad (see BAD_MEMBERS); returns the keys of the good ones, in order.

    Sample 3 has a truncated JPEG, 7 a zero-byte image, 11 a caption that is not UTF-8, 14 reuses the key
    of sample 13, 17 has no caption, and the tar file ends in the middle of sample 19's image.
    """
    members, good = [], []
    for i in range(20):
        key = "s013" if i == 14 else f"s{i:03d}"
        image = image_bytes(i)
        if i == 3:
            image = image[: len(image) // 3]
        if i == 7:
            image = b""
        caption = b"\xff\xfe caption in latin-1 \xe9" if i == 11 else f"caption {i}".encode()
        members.append((f"{key}.jpg", image))
        if i != 17:
            members.append((f"{key}.txt", caption))
        if i not in BAD_MEMBERS:
            good.append(key)
    write_tar(path, members)
    with tarfile.open(path) as tar:
        last = tar.getmember("s019.jpg")
    with open(path, "r+b") as handle:
        handle.truncate(last.offset_data + last.size // 2)
    return good


@pytest.fixture(autouse=True)
def one_thread():
    """Run torch on one thread: on a shared 2-core machine, two OpenMP threads per process can make a
    training step ten times slower, and every run compared bit for bit must use the same thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
