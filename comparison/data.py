"""Data sets as in-memory uint8 images, and the seeded batch order every method shares."""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

# The thesis normalised CIFAR-10 with mean = std = 0.5 per channel; digits use the same.
NORMALIZE_MEAN = 0.5
NORMALIZE_STD = 0.5
IMAGE_SHAPE = (3, 32, 32)

# File layout of the "python version" archives from https://www.cs.toronto.edu/~kriz/cifar.html,
# which is also what torchvision downloads and extracts.
CIFAR_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": "labels",
        "num_classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "label_key": "fine_labels",
        "num_classes": 100,
    },
}
# Every data set the harness reads: the embedded one first (the default), then the CIFAR ones.
DATASETS = ("digits",) + tuple(CIFAR_LAYOUT)
DIGITS_NUM_CLASSES = 10


def num_classes(dataset: str) -> int:
    """How many classes ``dataset`` has (one of :data:`DATASETS`)."""
    if dataset == "digits":
        return DIGITS_NUM_CLASSES
    if dataset not in CIFAR_LAYOUT:
        raise ValueError(f"unknown dataset {dataset!r}; valid choices: {', '.join(DATASETS)}")
    return CIFAR_LAYOUT[dataset]["num_classes"]


DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not where the run looks for them; the message says where to put them."""


@dataclass(frozen=True)
class ImageSplit:
    r"""One split of a data set, held in memory.

    Attributes:
        images: uint8 tensor of shape :math:`(N, 3, 32, 32)`.
        labels: int64 tensor of shape :math:`(N,)`.

    Example::

        >>> split = ImageSplit(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.arange(4))
        >>> x, y = split.batch(torch.tensor([0, 2]))
        >>> x.shape, x.dtype
        (torch.Size([2, 3, 32, 32]), torch.float32)
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or tuple(self.images.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(
                f"images must be uint8 of shape (N, 3, 32, 32), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, limit: int | None) -> "ImageSplit":
        """The first ``limit`` samples (all when ``limit`` is None or larger than the split)."""
        if limit is None or limit >= len(self):
            return self
        return ImageSplit(self.images[:limit], self.labels[:limit])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 images and their labels for ``indices``."""
        x = self.images[indices].float().div_(255.0)
        return x.sub_(NORMALIZE_MEAN).div_(NORMALIZE_STD), self.labels[indices]


@dataclass(frozen=True)
class Dataset:
    """A named data set: train and test splits and the number of classes."""

    name: str
    train: ImageSplit
    test: ImageSplit
    num_classes: int


def load_dataset(
    name: str,
    data_dir: str | Path = "data",
    *,
    download: bool = False,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Dataset:
    """Load ``digits``, ``cifar10`` or ``cifar100`` into memory.

    Args:
        name: data set name.
        data_dir: folder holding the CIFAR folders (unused for digits).
        download: let torchvision download CIFAR into ``data_dir`` if it is missing.
        limit_train: keep only the first N training samples.
        limit_test: keep only the first N test samples.

    Raises:
        ValueError: unknown ``name``.
        DatasetNotFoundError: CIFAR files missing (and download not allowed or failed).
    """
    if name == "digits":
        dataset = load_digits()
    elif name in CIFAR_LAYOUT:
        dataset = load_cifar(name, data_dir, download=download)
    else:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")
    return Dataset(dataset.name, dataset.train.head(limit_train), dataset.test.head(limit_test), dataset.num_classes)


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images) resized to 32x32, three channels, fixed stratified split.

    The split (80 % train, 20 % test) does not depend on the run's seed, so every seed is
    evaluated on the same test images.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    # Pixel values are 0..16; bilinear resizing keeps strokes smooth at 32x32.
    small = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    large = F.interpolate(small, size=IMAGE_SHAPE[1:], mode="bilinear", align_corners=False)
    images = (large.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=bunch.target
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return Dataset("digits", ImageSplit(images[train_idx], labels[train_idx]),
                   ImageSplit(images[test_idx], labels[test_idx]), DIGITS_NUM_CLASSES)


def load_cifar(name: str, data_dir: str | Path, *, download: bool = False, verify_checksums: bool = True) -> Dataset:
    """CIFAR-10 or CIFAR-100 from the python-pickle batches under ``data_dir``, read by torchvision.

    ``torchvision.datasets.CIFAR10`` / ``CIFAR100`` read the files (and check their MD5 sums
    unless ``verify_checksums`` is False, which tests use for their tiny files). With
    ``download=True`` a missing set is fetched through torchvision.

    Raises:
        DatasetNotFoundError: a file is missing or fails its checksum; the message names it and
            says where the extracted archive must go.
        ValueError: a file is not a CIFAR batch.
    """
    layout = CIFAR_LAYOUT[name]
    folder = Path(data_dir) / layout["folder"]
    files = layout["train"] + layout["test"]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and download:
        _download_cifar(name, Path(data_dir))
        missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{name} not found: {folder} lacks {', '.join(missing)}. Download {layout['archive']} from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {Path(data_dir).resolve()} "
            f"(so that {folder / files[0]} exists), point --data-dir at the folder that holds "
            f"{layout['folder']}/, or pass --download to let torchvision fetch it."
        )
    dataset_class = _torchvision_cifar(name, verify_checksums)
    splits = []
    for train in (True, False):
        try:
            dataset = dataset_class(root=str(data_dir), train=train, download=False)
        except RuntimeError as error:  # torchvision's "not found or corrupted"
            raise DatasetNotFoundError(
                f"{name} files in {folder} failed torchvision's check ({error}); extract "
                f"{layout['archive']} again into {Path(data_dir).resolve()}"
            ) from error
        except (KeyError, ValueError, EOFError, pickle.UnpicklingError) as error:
            raise ValueError(
                f"{folder} holds a file that is not a CIFAR batch: expected a pickled dict with 'data' and "
                f"{layout['label_key']!r}; reading it failed with {type(error).__name__}: {error}"
            ) from error
        images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
        splits.append(ImageSplit(images, torch.as_tensor(dataset.targets, dtype=torch.int64)))
    return Dataset(name, splits[0], splits[1], layout["num_classes"])


def _torchvision_cifar(name: str, verify_checksums: bool) -> type:
    """torchvision's CIFAR class for ``name``; without checksums, one that only checks the files exist."""
    import torchvision

    base = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    if verify_checksums:
        return base
    # torchvision's check_integrity(path, md5=None) only checks that the file exists.
    return type(f"Unverified{base.__name__}", (base,), {
        "train_list": [[file_name, None] for file_name, _ in base.train_list],
        "test_list": [[file_name, None] for file_name, _ in base.test_list],
        "meta": {**base.meta, "md5": None},
    })


def _download_cifar(name: str, data_dir: Path) -> None:
    import torchvision

    dataset_class = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        dataset_class(root=str(data_dir), train=True, download=True)
    except Exception as error:  # network errors come in many types; all mean the same here
        raise DatasetNotFoundError(
            f"could not download {name} into {data_dir}: {error}. Download "
            f"{CIFAR_LAYOUT[name]['archive']} from https://www.cs.toronto.edu/~kriz/cifar.html by hand and "
            f"extract it there."
        ) from error


def derive_seed(seed: int, stream: str, index: int = 0) -> int:
    """A 63-bit seed that depends only on (seed, stream, index), stable across processes and versions.

    Python's ``hash`` of a string changes per process; this does not.
    """
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def batch_order(n_samples: int, batch_size: int, seed: int, stream: str, epoch: int) -> list[torch.Tensor]:
    """Index tensors of one epoch's training batches, a function of its arguments only.

    Every method calls this with the same ``(seed, stream, epoch)`` and therefore sees the same
    samples in the same batches in the same order. The last, incomplete batch is dropped when
    at least one full batch exists, so batch statistics never see a batch of one.
    """
    if n_samples < 1:
        raise ValueError(f"cannot make batches of an empty split (n_samples={n_samples})")
    generator = torch.Generator().manual_seed(derive_seed(seed, stream, epoch))
    permutation = torch.randperm(n_samples, generator=generator)
    batches = list(permutation.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def train_batches(
    split: ImageSplit, batch_size: int, seed: int, stream: str, epoch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the ``(images, labels)`` batches of :func:`batch_order`."""
    for indices in batch_order(len(split), batch_size, seed, stream, epoch):
        yield split.batch(indices)


def eval_batches(split: ImageSplit, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the whole split in its stored order, in batches of ``batch_size`` (last one may be short)."""
    for indices in torch.arange(len(split)).split(batch_size):
        yield split.batch(indices)
