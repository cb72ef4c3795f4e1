"""Tests of the benchmark data loaders on small files the tests write."""

import dataclasses
import gzip
import importlib.resources
import pickle
import sys

import numpy as np
import pytest

from benchmarks import data


@pytest.fixture(autouse=True)
def isolated_places(tmp_path, monkeypatch):
    """Points every default place at empty folders, so only test files count."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_home"))
    system = tmp_path / "system" / "fashion-mnist"
    spec = dataclasses.replace(
        data._IMAGE_SPECS["fashion_mnist"], system_paths=(str(system),)
    )
    monkeypatch.setitem(data._IMAGE_SPECS, "fashion_mnist", spec)
    return tmp_path


def write_idx(path, array, compress=True):
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C}
    codes.update({np.float32: 0x0D, np.float64: 0x0E})
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if compress else payload)


def make_mnist_like(seed, num_train=5, num_test=3):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_train + num_test, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, num_train + num_test).astype(np.uint8)
    return images, labels


def write_mnist_folder(folder, images, labels, num_train=5, compress=True):
    suffix = ".gz" if compress else ""
    parts = {
        "train-images-idx3-ubyte": images[:num_train],
        "train-labels-idx1-ubyte": labels[:num_train],
        "t10k-images-idx3-ubyte": images[num_train:],
        "t10k-labels-idx1-ubyte": labels[num_train:],
    }
    for stem, array in parts.items():
        write_idx(folder / (stem + suffix), array, compress)


def assert_images(ds, images, labels, num_classes=10):
    np.testing.assert_array_equal(ds.x, images.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(ds.y, labels)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.num_classes == num_classes and ds.true_probs is None


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
)
def test_read_idx_round_trips_every_type(tmp_path, dtype, compress):
    array = (np.arange(24).reshape(2, 3, 4) * 37 - 100).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10
    write_idx(tmp_path / "a", array, compress)
    result = data.read_idx(tmp_path / "a")
    np.testing.assert_array_equal(result, array)
    assert result.dtype == np.dtype(dtype) and result.dtype.isnative


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="is not an IDX file"):
        data.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 2), np.uint8), compress=False)
    truncated = (tmp_path / "short").read_bytes()[:-1]
    (tmp_path / "short").write_bytes(truncated)
    with pytest.raises(ValueError, match=r"announces shape \(4, 2\)"):
        data.read_idx(tmp_path / "short")


def test_mnist_from_data_dir_merges_train_then_test(tmp_path):
    images, labels = make_mnist_like(0)
    write_mnist_folder(tmp_path / "data" / "mnist", images, labels)
    data.check_available("mnist", data_dir=tmp_path / "data")
    ds = data.load_dataset("mnist", data_dir=str(tmp_path / "data"))
    assert ds.name == "mnist" and ds.x.shape == (8, 28, 28)
    assert_images(ds, images, labels)


def test_fashion_mnist_from_env_folder_uncompressed(tmp_path, monkeypatch):
    images, labels = make_mnist_like(1)
    write_mnist_folder(tmp_path / "env" / "fashion-mnist", images, labels, 5, False)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    assert_images(data.load_dataset("fashion_mnist"), images, labels)


def test_idx_files_directly_in_data_dir(tmp_path):
    images, labels = make_mnist_like(2)
    write_mnist_folder(tmp_path / "flat", images, labels)
    assert_images(data.load_dataset("fashion_mnist", tmp_path / "flat"), images, labels)


def test_keras_cache_layouts(tmp_path):
    cache = tmp_path / "keras_home" / "datasets"
    images, labels = make_mnist_like(3)
    cache.mkdir(parents=True)
    np.savez(
        cache / "mnist.npz",
        x_train=images[:5],
        y_train=labels[:5],
        x_test=images[5:],
        y_test=labels[5:],
    )
    assert_images(data.load_dataset("mnist"), images, labels)
    images, labels = make_mnist_like(4)
    write_mnist_folder(cache / "fashion-mnist", images, labels)
    assert_images(data.load_dataset("fashion_mnist"), images, labels)


def test_debian_package_folder_is_the_last_resort(tmp_path):
    images, labels = make_mnist_like(5)
    write_mnist_folder(tmp_path / "system" / "fashion-mnist", images, labels)
    assert_images(data.load_dataset("fashion_mnist"), images, labels)


def test_search_order(tmp_path, monkeypatch):
    """data_dir, then $KERAS_LABEL_RELAX_DATA, then the Keras cache, then /usr."""
    places = [
        tmp_path / "explicit" / "fashion-mnist",
        tmp_path / "env" / "fashion-mnist",
        tmp_path / "keras_home" / "datasets" / "fashion-mnist",
        tmp_path / "system" / "fashion-mnist",
    ]
    written = []
    for seed, folder in enumerate(places):
        written.append(make_mnist_like(10 + seed))
        write_mnist_folder(folder, *written[-1])
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    assert_images(
        data.load_dataset("fashion_mnist", tmp_path / "explicit"), *written[0]
    )
    assert_images(data.load_dataset("fashion_mnist"), *written[1])
    monkeypatch.delenv(data.DATA_DIR_ENV)
    assert_images(data.load_dataset("fashion_mnist"), *written[2])
    for path in places[2].iterdir():
        path.unlink()
    assert_images(data.load_dataset("fashion_mnist"), *written[3])


def write_cifar_pickle(path, images, labels, label_key):
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    batch = {b"batch_label": b"test", b"data": rows, label_key: list(labels)}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [label // 5 for label in labels]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def test_cifar10_batches_in_keras_cache(tmp_path):
    folder = tmp_path / "keras_home" / "datasets" / "cifar-10-batches-py-target"
    folder = folder / "cifar-10-batches-py"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    images[0, 1, 2] = [10, 20, 30]  # row 1, column 2: red, green, blue
    labels = rng.integers(0, 10, 12)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        part = slice(2 * i, 2 * i + 2)
        write_cifar_pickle(folder / name, images[part], labels[part], b"labels")
    ds = data.load_dataset("cifar10")
    assert ds.x.shape == (12, 32, 32, 3)
    np.testing.assert_allclose(ds.x[0, 1, 2] * 255, [10, 20, 30], rtol=1e-6)
    assert_images(ds, images, labels)


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "data" / "cifar-100-python"
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    labels = np.array([99, 0, 57, 3, 12, 98, 40])
    write_cifar_pickle(folder / "train", images[:4], labels[:4], b"fine_labels")
    write_cifar_pickle(folder / "test", images[4:], labels[4:], b"fine_labels")
    ds = data.load_dataset("cifar100", tmp_path / "data")
    assert_images(ds, images, labels, num_classes=100)


def test_missing_data_gives_one_error_naming_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    with pytest.raises(data.DataNotFoundError) as info:
        data.check_available("fashion_mnist", data_dir=tmp_path / "explicit")
    message = str(info.value)
    for place in [
        tmp_path / "explicit" / "fashion-mnist",
        tmp_path / "env",
        tmp_path / "tfds_home" / "fashion_mnist",
        tmp_path / "keras_home" / "datasets" / "fashion-mnist",
        tmp_path / "system" / "fashion-mnist",
    ]:
        assert str(place) in message
    for hint in [
        "apt-get install dataset-fashion-mnist",
        "keras.datasets.fashion_mnist.load_data()",
        "tfds.load('fashion_mnist')",
        "--data-dir",
        data.DATA_DIR_ENV,
        "train-images-idx3-ubyte",
    ]:
        assert hint in message
    with pytest.raises(data.DataNotFoundError, match="cifar-10-python.tar.gz"):
        data.load_dataset("cifar10")


def test_malformed_files_raise_value_error_naming_them(tmp_path):
    images, labels = make_mnist_like(6)
    labels[2] = 10
    write_mnist_folder(tmp_path / "mnist", images, labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        data.load_dataset("mnist", tmp_path)
    images, labels = make_mnist_like(7)
    write_mnist_folder(tmp_path / "mnist", images, labels[:-1])
    with pytest.raises(ValueError, match="images but"):
        data.load_dataset("mnist", tmp_path)


def write_fake_tfds_folder(root, name):
    version = root / name / "3.0.1"
    version.mkdir(parents=True)
    (version / "dataset_info.json").write_text("{}")


def test_tfds_not_installed_falls_back_to_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    write_fake_tfds_folder(tmp_path / "data", "mnist")
    images, labels = make_mnist_like(8)
    write_mnist_folder(tmp_path / "data" / "mnist", images, labels)
    assert_images(data.load_dataset("mnist", tmp_path / "data"), images, labels)
    message = ""
    try:
        data.check_available("cifar10", tmp_path / "data")
    except data.DataNotFoundError as error:
        message = str(error)
    assert "tensorflow-datasets is not installed" in message


def test_tfds_failure_warns_and_falls_back_to_files(tmp_path, monkeypatch):
    if not data._tfds_available():
        pytest.skip("tensorflow-datasets is not installed")
    write_fake_tfds_folder(tmp_path / "tfds_home", "mnist")
    images, labels = make_mnist_like(9)
    write_mnist_folder(tmp_path / "keras_home" / "datasets" / "mnist", images, labels)
    with pytest.warns(UserWarning, match="tensorflow-datasets could not read"):
        ds = data.load_dataset("mnist")
    assert_images(ds, images, labels)


def test_tfds_prepared_data_is_read_offline(tmp_path, monkeypatch):
    tf = pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    # tfds 4.9 imports `importlib_resources` when it writes a dataset but only
    # declares it for Python < 3.9; the standard library has the same API.
    monkeypatch.setitem(sys.modules, "importlib_resources", importlib.resources)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 5)

    def split_data(part):
        return tf.data.Dataset.from_tensor_slices(
            {"image": images[part], "label": labels[part]}
        )

    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }
    )
    tfds.dataset_builders.store_as_tfds_dataset(
        name="fashion_mnist",
        version="3.0.1",
        features=features,
        split_datasets={"train": split_data(slice(3)), "test": split_data(slice(3, 5))},
        data_dir=tmp_path / "data",
        disable_shuffling=True,
    )
    ds = data.load_dataset("fashion_mnist", tmp_path / "data")
    assert_images(ds, images[..., 0], labels)


def test_digits():
    ds = data.load_dataset("digits")
    data.check_available("digits")
    assert ds.x.shape == (1797, 64) and ds.x.dtype == np.float32
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert ds.y.dtype == np.int64 and set(ds.y) == set(range(10))
    assert ds.num_classes == 10 and ds.true_probs is None


def test_synthetic_has_known_probabilities():
    data.check_available("synthetic")
    ds = data.load_dataset("synthetic")
    n, k = len(ds), ds.num_classes
    assert ds.x.shape == (n, data.SYNTHETIC_FEATURES) and ds.x.dtype == np.float32
    assert ds.true_probs.shape == (n, k) and ds.y.dtype == np.int64
    np.testing.assert_allclose(ds.true_probs.sum(axis=1), 1.0, atol=1e-6)
    assert ds.true_probs.min() >= 0.0
    # Far from one-hot, so calibration matters.
    assert 0.5 < ds.true_probs.max(axis=1).mean() < 0.9
    # Labels drawn from p*: class frequencies match the mean probabilities,
    # and p*_y averages sum_k p*_k^2, each within 5 standard errors.
    probs = ds.true_probs.astype(np.float64)
    counts = np.bincount(ds.y, minlength=k)
    expected = probs.sum(axis=0)
    std = np.sqrt((probs * (1 - probs)).sum(axis=0))
    assert np.all(np.abs(counts - expected) < 5 * std)
    p_y = probs[np.arange(n), ds.y]
    assert abs(p_y.mean() - (probs**2).sum(axis=1).mean()) < 5 * p_y.std() / np.sqrt(n)
    again = data.load_dataset("synthetic")
    np.testing.assert_array_equal(again.x, ds.x)
    np.testing.assert_array_equal(again.y, ds.y)
    np.testing.assert_array_equal(again.true_probs, ds.true_probs)


def test_split_is_a_seeded_partition():
    ds = data.load_dataset("synthetic")
    rest, held_out = data.split(ds, 1 / 6, seed=3)
    assert len(held_out) == round(len(ds) / 6) and len(rest) + len(held_out) == len(ds)
    rows = np.concatenate([rest.x, held_out.x])
    order = np.lexsort(rows.T)
    np.testing.assert_array_equal(rows[order], ds.x[np.lexsort(ds.x.T)])
    index = np.flatnonzero(np.isin(ds.x[:, 0], held_out.x[:, 0]))
    np.testing.assert_array_equal(ds.y[index], held_out.y)
    np.testing.assert_array_equal(ds.true_probs[index], held_out.true_probs)
    same = data.split(ds, 1 / 6, seed=3)[1]
    other = data.split(ds, 1 / 6, seed=4)[1]
    np.testing.assert_array_equal(same.x, held_out.x)
    assert not np.array_equal(other.x, held_out.x)
    assert rest.name == held_out.name == "synthetic" and rest.num_classes == 8


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1e-9, "0.1", True])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        data.split(data.load_digits(), fraction, seed=0)


@pytest.mark.parametrize("seed", [-1, 1.5, None, True])
def test_split_rejects_bad_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        data.split(data.load_digits(), 0.5, seed=seed)


def test_subtract_pixel_mean_uses_the_training_mean_only():
    rng = np.random.default_rng(0)
    train = rng.random((10, 4, 4, 3)).astype(np.float32)
    test = rng.random((3, 4, 4, 3)).astype(np.float32)
    new_train, new_test = data.subtract_pixel_mean(train, test)
    mean = train.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(new_train, train - mean, atol=1e-6)
    np.testing.assert_allclose(new_test, test - mean, atol=1e-6)
    assert new_train.dtype == np.float32 and new_test.dtype == np.float32
    assert data.subtract_pixel_mean(train)[0].shape == train.shape
    with pytest.raises(ValueError, match=r"others\[0\]"):
        data.subtract_pixel_mean(train, test[:, :2])


@pytest.mark.parametrize("name", ["imagenet", None, "MNIST"])
def test_unknown_dataset_name(name):
    with pytest.raises(ValueError, match="`name`"):
        data.load_dataset(name)
    with pytest.raises(ValueError, match="`name`"):
        data.check_available(name)
