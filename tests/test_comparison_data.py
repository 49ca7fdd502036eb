"""Data sets (digits, CIFAR from its on-disk pickle format) and the seeded batch order."""

import pickle

import numpy as np
import pytest
import torch

from comparison.data import (
    CIFAR_LAYOUT,
    DatasetNotFoundError,
    ImageSplit,
    batch_order,
    derive_seed,
    eval_batches,
    load_cifar,
    load_dataset,
    train_batches,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_shapes_split_and_normalisation(digits):
    assert digits.num_classes == 10
    assert len(digits.train) + len(digits.test) == 1797
    assert len(digits.test) == pytest.approx(0.2 * 1797, abs=1)
    assert digits.train.images.shape[1:] == (3, 32, 32) and digits.train.images.dtype == torch.uint8
    # three identical channels: the grey digit replicated
    assert torch.equal(digits.train.images[:, 0], digits.train.images[:, 2])
    assert set(digits.test.labels.tolist()) == set(range(10))
    x, _ = digits.train.batch(torch.arange(8))
    assert x.dtype == torch.float32 and x.min() >= -1.0 and x.max() <= 1.0 and x.max() > 0.5


def test_digits_split_is_fixed(digits):
    again = load_dataset("digits")
    assert torch.equal(again.test.images, digits.test.images)
    assert torch.equal(again.train.labels, digits.train.labels)


def test_limits_keep_the_first_samples(digits):
    limited = load_dataset("digits", limit_train=50, limit_test=7)
    assert len(limited.train) == 50 and len(limited.test) == 7
    assert torch.equal(limited.train.images, digits.train.images[:50])


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="mnist.*digits, cifar10, cifar100"):
        load_dataset("mnist")


def test_batch_order_is_a_function_of_seed_stream_and_epoch():
    first = batch_order(100, 16, seed=3, stream="finetune", epoch=2)
    again = batch_order(100, 16, seed=3, stream="finetune", epoch=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == len(again)
    assert not torch.equal(torch.cat(first), torch.cat(batch_order(100, 16, 3, "finetune", 3)))
    assert not torch.equal(torch.cat(first), torch.cat(batch_order(100, 16, 4, "finetune", 2)))
    assert not torch.equal(torch.cat(first), torch.cat(batch_order(100, 16, 3, "pretrain", 2)))


def test_batch_order_covers_distinct_samples_and_drops_the_short_tail():
    batches = batch_order(100, 16, 0, "finetune", 0)
    assert [len(b) for b in batches] == [16] * 6
    flat = torch.cat(batches)
    assert len(set(flat.tolist())) == 96
    # fewer samples than a batch: keep the one short batch rather than nothing
    assert [len(b) for b in batch_order(5, 16, 0, "x", 0)] == [5]


def test_derive_seed_is_stable_across_processes():
    # A fixed value: Python's hash() would change per process, this must not.
    assert derive_seed(0, "finetune", 1) == derive_seed(0, "finetune", 1)
    assert derive_seed(0, "finetune", 1) != derive_seed(1, "finetune", 1)
    assert 0 <= derive_seed(123, "x", 4) < 2**63


def test_train_and_eval_batches(digits):
    split = digits.test.head(40)
    images = torch.cat([x for x, _ in eval_batches(split, 16)])
    assert images.shape[0] == 40
    seen = [y for _, y in train_batches(split, 16, seed=0, stream="s", epoch=0)]
    assert sum(len(y) for y in seen) == 32


def test_image_split_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="uint8 of shape"):
        ImageSplit(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        ImageSplit(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


def _write_cifar(root, name, per_file):
    """Tiny files in the CIFAR python-pickle format; pixel value = sample index, label = index % classes."""
    layout = CIFAR_LAYOUT[name]
    folder = root / layout["folder"]
    folder.mkdir(parents=True)
    meta_file, meta_key = ("batches.meta", "label_names") if name == "cifar10" else ("meta", "fine_label_names")
    with open(folder / meta_file, "wb") as handle:
        pickle.dump({meta_key: [f"class {i}" for i in range(layout["num_classes"])]}, handle)
    counter = 0
    for file_name in layout["train"] + layout["test"]:
        data = np.zeros((per_file, 3072), dtype=np.uint8)
        labels = []
        for row in range(per_file):
            data[row, :1024] = counter % 256        # red plane
            data[row, 1024:2048] = 7                # green plane
            labels.append(counter % layout["num_classes"])
            counter += 1
        entry = {"data": data, layout["label_key"]: labels, "batch_label": file_name}
        with open(folder / file_name, "wb") as handle:
            pickle.dump(entry, handle)
    return counter


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_through_torchvision(tmp_path, name):
    total = _write_cifar(tmp_path, name, per_file=4)
    dataset = load_cifar(name, tmp_path, verify_checksums=False)
    layout = CIFAR_LAYOUT[name]
    n_test = 4 * len(layout["test"])
    assert len(dataset.train) == total - n_test and len(dataset.test) == n_test
    assert dataset.num_classes == layout["num_classes"]
    # CHW order: plane 0 carries the index, plane 1 the constant 7
    assert dataset.train.images[3, 0].unique().tolist() == [3]
    assert dataset.train.images[3, 1].unique().tolist() == [7]
    assert dataset.train.labels[:4].tolist() == [i % layout["num_classes"] for i in range(4)]
    assert dataset.test.labels[0].item() == (total - n_test) % layout["num_classes"]


def test_missing_cifar_says_where_to_put_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset("cifar10", tmp_path)
    message = str(error.value)
    assert "cifar-10-batches-py" in message and "data_batch_1" in message and str(tmp_path) in message
    assert "--download" in message


def test_corrupt_cifar_file_is_reported(tmp_path):
    _write_cifar(tmp_path, "cifar100", per_file=2)
    with open(tmp_path / "cifar-100-python" / "test", "wb") as handle:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8)}, handle)
    with pytest.raises(ValueError, match="fine_labels"):
        load_cifar("cifar100", tmp_path, verify_checksums=False)


def test_cifar_checksums_are_verified_by_default(tmp_path):
    _write_cifar(tmp_path, "cifar10", per_file=2)
    with pytest.raises(DatasetNotFoundError, match="failed torchvision's check"):
        load_dataset("cifar10", tmp_path)
