"""Datasets of ``tritonorm compare``: scikit-learn's bundled digits and CIFAR-10.

Both give float32 images of shape (N, C, H, W) with values in [0, 1] (no per-channel
standardization here: EquiNorm assumes positive inputs; ``compare --standardize`` applies it)
and int64 labels 0..9.  A directory that
cannot be read as CIFAR-10 raises ``DataError`` with a one-line message naming the path.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
CIFAR_SUBDIR = "cifar-10-batches-py"
CIFAR_SHAPE = (3, 32, 32)
CLASSES = 10
DIGITS_TEST_FRACTION = 0.25


class DataError(Exception):
    """A dataset that cannot be loaded; the message is one line for the user."""


class Dataset(NamedTuple):
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def describe(self) -> str:
        """'name: N train / M test images of C x H x W'."""
        shape = " x ".join(map(str, self.x_train.shape[1:]))
        return f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test images of {shape}"


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), values / 16, split
    once and for all into 75% train and 25% test, stratified by class (random_state=0).
    Needs scikit-learn (the ``compare`` extra)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x = digits.images.astype(np.float32)[:, None] / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=DIGITS_TEST_FRACTION, stratify=digits.target, random_state=0)
    return Dataset("digits", *map(torch.from_numpy, (x_train, y_train.astype(np.int64), x_test,
                                                     y_test.astype(np.int64))))


def load_cifar10(directory: str | Path) -> Dataset:
    """CIFAR-10 from the python-pickle batches (data_batch_1..5 and test_batch) in
    ``directory`` or in its ``cifar-10-batches-py`` subdirectory; pixels / 255."""
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"--cifar10 {root}: no such directory")
    if (root / CIFAR_SUBDIR).is_dir():
        root = root / CIFAR_SUBDIR
    missing = [name for name in (*CIFAR_TRAIN, CIFAR_TEST) if not (root / name).is_file()]
    if missing:
        raise DataError(f"--cifar10 {root}: missing {', '.join(missing)} (expected the CIFAR-10 python batches "
                        f"{', '.join(CIFAR_TRAIN)} and {CIFAR_TEST})")
    train = [read_cifar_batch(root / name) for name in CIFAR_TRAIN]
    x_test, y_test = read_cifar_batch(root / CIFAR_TEST)
    return Dataset("cifar10", torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), x_test, y_test)


_RECONSTRUCT = np.empty(0).__reduce__()[0]
_FROMBUFFER = np.empty(0).__reduce_ex__(5)[0]
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _RECONSTRUCT for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _FROMBUFFER for core in ("core", "_core")},
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays, and refuses every other
    global, so that a batch file cannot run code."""

    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One CIFAR-10 batch: a pickled dict with b"data", uint8 (N, 3072) (the red, green, blue
    planes of 32x32 images), and b"labels", N integers in 0..9; returns float32 images
    (N, 3, 32, 32) in [0, 1] and int64 labels."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as err:  # any unreadable or truncated pickle is a malformed batch
        raise DataError(f"{path}: not a CIFAR-10 batch: cannot unpickle it ({type(err).__name__}: {err})") from None
    data, labels = _batch_fields(path, batch)
    x = torch.from_numpy(data.reshape(-1, *CIFAR_SHAPE).astype(np.float32) / 255.0)
    return x, torch.from_numpy(labels)


def _batch_fields(path: Path, batch) -> tuple[np.ndarray, np.ndarray]:
    """The checked b"data" array and b"labels" as an int64 array."""
    def bad(what: str) -> DataError:
        return DataError(f"{path}: not a CIFAR-10 batch: {what}")

    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise bad(f"expected a dict with b'data' and b'labels', got {keys}")
    data = batch[b"data"]
    size = int(np.prod(CIFAR_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != size:
        got = f"{data.dtype} of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise bad(f"b'data' must be a uint8 array of shape (N, {size}), got {got}")
    try:
        labels = np.asarray(batch[b"labels"])
    except ValueError:
        labels = np.empty(0, dtype=object)
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu" or (len(labels) and not (
            labels.min() >= 0 and labels.max() < CLASSES)):
        raise bad(f"b'labels' must be {len(data)} integers in 0..{CLASSES - 1}")
    return data, labels.astype(np.int64)
