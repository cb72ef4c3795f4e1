"""Datasets for the benchmarks, read from local files only.

`load_dataset(name)` returns one `Dataset` that holds the original training
part followed by the original test part, in their original order (or, for
data prepared by tensorflow-datasets, in its fixed order); the benchmark
re-splits it per seed with `split`. Pixels are float32 in [0, 1], labels int64.

| name | x | classes | examples |
|---|---|---|---|
| "mnist", "fashion_mnist" | (N, 28, 28) | 10 | 60000 + 10000 |
| "cifar10", "cifar100" | (N, 32, 32, 3) | 10 / 100 (fine labels) | 50000 + 10000 |
| "digits" | (N, 64), scikit-learn's 8x8 digits | 10 | 1797 |
| "synthetic" | (N, 16), known class probabilities | 8 | 10000 |

Nothing is ever downloaded. The image datasets are looked up in this order:

1. `data_dir`, then `$KERAS_LABEL_RELAX_DATA`: data prepared by
   tensorflow-datasets (`<root>/<tfds name>/<version>/`), or the raw files in a
   sub-folder named after the dataset or in `<root>` itself;
2. tensorflow-datasets' own folder (`$TFDS_DATA_DIR`, default
   `~/tensorflow_datasets`), already prepared data only;
3. the Keras cache (`$KERAS_HOME/datasets`, default `~/.keras/datasets`), laid
   out as `keras.datasets` stores it;
4. `/usr/share/datasets/fashion-mnist` for Fashion-MNIST (Debian package
   `dataset-fashion-mnist`).

Raw files are the IDX files of the MNIST-type data (`train-images-idx3-ubyte`,
`train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`,
each gzipped or not), Keras' `mnist.npz`, and the python pickles of CIFAR
(`cifar-10-batches-py/`, `cifar-100-python/`). The pickles are unpickled, so
only point the loaders at files you trust.
"""

import dataclasses
import gzip
import importlib.util
import math
import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np

DATASET_NAMES = (
    "mnist",
    "fashion_mnist",
    "cifar10",
    "cifar100",
    "digits",
    "synthetic",
)
DATA_DIR_ENV = "KERAS_LABEL_RELAX_DATA"

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_CIFAR100_FILES = ("train", "test")


@dataclasses.dataclass
class Dataset:
    """A classification dataset held in memory.

    Args:
        name: the dataset's name, one of `DATASET_NAMES`.
        x: float32 inputs in the model's layout, pixels scaled to [0, 1].
        y: int64 class ids, shape `(N,)`.
        num_classes: the number of classes K.
        true_probs: `(N, K)` true class probabilities where they are known
            (the synthetic task), else `None`.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    true_probs: np.ndarray | None = None

    def __len__(self):
        return len(self.y)


class DataNotFoundError(RuntimeError):
    """A dataset is not on this machine; the message says where it looked."""


@dataclasses.dataclass(frozen=True)
class _ImageSpec:
    name: str
    num_classes: int
    image_shape: tuple
    file_format: str  # "idx", "cifar10" or "cifar100"
    tfds_name: str
    folders: tuple  # tried under each root given by the user
    keras_cache: tuple  # tried under the Keras cache
    system_paths: tuple = ()
    how_to_get: tuple = ()


_IMAGE_SPECS = {
    "mnist": _ImageSpec(
        name="mnist",
        num_classes=10,
        image_shape=(28, 28),
        file_format="idx",
        tfds_name="mnist",
        folders=("mnist", "MNIST/raw", "mnist.npz"),
        keras_cache=("mnist.npz", "mnist"),
        how_to_get=(
            'python -c "import keras; keras.datasets.mnist.load_data()" '
            "(writes ~/.keras/datasets/mnist.npz; copy it to the same place "
            "here)",
        ),
    ),
    "fashion_mnist": _ImageSpec(
        name="fashion_mnist",
        num_classes=10,
        image_shape=(28, 28),
        file_format="idx",
        tfds_name="fashion_mnist",
        folders=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
        keras_cache=("fashion-mnist",),
        system_paths=("/usr/share/datasets/fashion-mnist",),
        how_to_get=(
            "sudo apt-get install dataset-fashion-mnist (Debian/Ubuntu; "
            "installs /usr/share/datasets/fashion-mnist)",
            'python -c "import keras; keras.datasets.fashion_mnist.load_data()" '
            "(writes ~/.keras/datasets/fashion-mnist/; copy it to the same "
            "place here)",
        ),
    ),
    "cifar10": _ImageSpec(
        name="cifar10",
        num_classes=10,
        image_shape=(32, 32, 3),
        file_format="cifar10",
        tfds_name="cifar10",
        folders=("cifar-10-batches-py", "cifar10/cifar-10-batches-py"),
        keras_cache=(
            "cifar-10-batches-py-target/cifar-10-batches-py",
            "cifar-10-batches-py",
        ),
        how_to_get=(
            'python -c "import keras; keras.datasets.cifar10.load_data()" '
            "(writes ~/.keras/datasets/cifar-10-batches-py-target/; copy it "
            "to the same place here)",
            "or unpack https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz "
            "into a folder and pass that folder as --data-dir",
        ),
    ),
    "cifar100": _ImageSpec(
        name="cifar100",
        num_classes=100,
        image_shape=(32, 32, 3),
        file_format="cifar100",
        tfds_name="cifar100",
        folders=("cifar-100-python", "cifar100/cifar-100-python"),
        keras_cache=("cifar-100-python-target/cifar-100-python", "cifar-100-python"),
        how_to_get=(
            'python -c "import keras; keras.datasets.cifar100.load_data()" '
            "(writes ~/.keras/datasets/cifar-100-python-target/; copy it to "
            "the same place here)",
            "or unpack https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz "
            "into a folder and pass that folder as --data-dir",
        ),
    ),
}


def check_available(name, data_dir=None):
    """Raises `DataNotFoundError` unless dataset `name` can be loaded here.

    Cheap: it looks for the files without reading them, so the benchmark can
    call it before any training starts.

    Args:
        name: one of `DATASET_NAMES`.
        data_dir: an optional folder searched first (see the module docstring).
    """
    name = _check_name(name)
    if name == "digits":
        if importlib.util.find_spec("sklearn") is None:
            raise DataNotFoundError(
                "Dataset 'digits' comes with scikit-learn, which is not "
                "installed. Install it with: pip install scikit-learn"
            )
        return
    if name in _IMAGE_SPECS:
        _found_sources(_IMAGE_SPECS[name], data_dir, raise_if_none=True)


def load_dataset(name, data_dir=None):
    """Loads dataset `name` with the original train and test parts merged.

    Args:
        name: one of `DATASET_NAMES`.
        data_dir: an optional folder searched first (see the module docstring).

    Returns:
        A `Dataset`: the original training examples first, then the original
        test examples, each in their original order.

    Raises:
        DataNotFoundError: the data is in none of the places searched.
        ValueError: `name` is unknown, or a file found is malformed.
    """
    name = _check_name(name)
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        return load_synthetic()
    spec = _IMAGE_SPECS[name]
    failures = []
    for kind, path in _found_sources(spec, data_dir, raise_if_none=True):
        if kind == "files":
            return _image_dataset(spec, *_read_files(spec, path), source=path)
        try:
            parts = _read_tfds(path)
        except Exception as error:  # any tfds failure falls back to files
            warnings.warn(
                f"tensorflow-datasets could not read {path} ({error!r}); "
                "trying the next place.",
                stacklevel=2,
            )
            failures.append(f"{path}: {error!r}")
            continue
        return _image_dataset(spec, *parts, source=path)
    raise DataNotFoundError(
        _not_found_message(spec, data_dir)
        + "\ntensorflow-datasets failed on: "
        + "; ".join(failures)
    )


def load_digits():
    """scikit-learn's 8x8 handwritten digits: x (1797, 64) in [0, 1], 10 classes."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return Dataset("digits", x, digits.target.astype(np.int64), num_classes=10)


SYNTHETIC_SEED = 1729
SYNTHETIC_SIZE = 10000
SYNTHETIC_FEATURES = 16
SYNTHETIC_CLASSES = 8
_SYNTHETIC_HIDDEN = 32


def load_synthetic():
    """A fixed 8-class task whose true class probabilities are known.

    With x ~ N(0, I_16), the true logits are a fixed random one-hidden-layer
    tanh network plus a linear term,

        z(x) = 4 * tanh(1.5 * x A / 4) B / sqrt(32) + x C / 4,

    with A (16, 32), B (32, 8) and C (16, 8) drawn once from N(0, 1);
    p*(x) = softmax(z(x)) and y ~ Categorical(p*(x)). Everything comes from
    `numpy.random.default_rng(SYNTHETIC_SEED)`, so the data are the same on
    every machine. The classes overlap: the largest true probability is
    0.67 on average (10% of examples below 0.40, 10% above 0.96), so the
    Bayes-optimal accuracy is about 0.67 and calibration matters. The
    true calibration error of a model is then mean |p_hat - p*|, which no
    binned ECE can measure.

    Returns:
        A `Dataset` of 10000 examples, x float32 (N, 16), y int64,
        `true_probs` float32 (N, 8) whose rows sum to 1.
    """
    rng = np.random.default_rng(SYNTHETIC_SEED)
    d, h, k = SYNTHETIC_FEATURES, _SYNTHETIC_HIDDEN, SYNTHETIC_CLASSES
    a = rng.normal(size=(d, h))
    b = rng.normal(size=(h, k))
    c = rng.normal(size=(d, k))
    x = rng.normal(size=(SYNTHETIC_SIZE, d))
    scale = math.sqrt(d)
    logits = 4.0 * np.tanh(1.5 * x @ a / scale) @ b / math.sqrt(h) + x @ c / scale
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    # Inverse-CDF sampling: y is the first class whose cumulative probability
    # exceeds a uniform draw.
    u = rng.random((SYNTHETIC_SIZE, 1))
    y = np.minimum((u > np.cumsum(probs, axis=1)).sum(axis=1), k - 1)
    return Dataset(
        "synthetic",
        x.astype(np.float32),
        y.astype(np.int64),
        num_classes=k,
        true_probs=probs.astype(np.float32),
    )


def split(ds, fraction, seed):
    """Splits `ds` at random into `(rest, held_out)`.

    Args:
        ds: a `Dataset`.
        fraction: the share of examples held out, in (0, 1); `held_out` gets
            `round(fraction * len(ds))` examples.
        seed: an int; the same seed gives the same split.

    Returns:
        `(rest, held_out)`, two `Dataset`s whose examples keep their order
        in `ds`.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(
            f"Argument `fraction` must be a number. Received: fraction={fraction!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(
            f"Argument `seed` must be an int >= 0. Received: seed={seed!r}"
        )
    rest, held_out = split_indices(len(ds.y), fraction, seed)
    return subset(ds, rest), subset(ds, held_out)


def split_indices(n, fraction, seed):
    """The indices `(rest, held_out)` that `split` uses for `n` examples."""
    num_held_out = round(fraction * n)
    if not 0 < num_held_out < n:
        raise ValueError(
            "Argument `fraction` must leave at least one example on each side "
            f"of the split of {n} examples. Received: fraction={fraction!r}"
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[num_held_out:]), np.sort(order[:num_held_out])


def subtract_pixel_mean(train_x, *others):
    """Subtracts the per-pixel mean of `train_x` from `train_x` and `others`.

    The CIFAR protocol: the mean over training examples of each pixel and
    channel is subtracted from every part, so no test statistics leak in.

    Returns:
        A tuple of new float32 arrays, `train_x` first, then `others`.
    """
    mean = np.mean(train_x, axis=0, dtype=np.float64).astype(np.float32)
    for i, other in enumerate(others):
        if np.shape(other)[1:] != np.shape(train_x)[1:]:
            raise ValueError(
                f"Argument `others[{i}]` must have the per-example shape of "
                f"`train_x`, {np.shape(train_x)[1:]}. Received: shape="
                f"{np.shape(other)}"
            )
    return tuple(np.asarray(a, np.float32) - mean for a in (train_x, *others))


def read_idx(path):
    """Reads an IDX file (gzipped or not) into a numpy array.

    IDX: two zero bytes, a type byte, the number of dimensions, then each
    dimension as a big-endian uint32, then the data, big-endian, row-major.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_TYPES:
        raise ValueError(
            f"{path} is not an IDX file: it starts with {data[:4]!r}, expected "
            "two zero bytes, a type code and the number of dimensions."
        )
    dtype = np.dtype(_IDX_TYPES[data[2]])
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(f"{path} is truncated: its IDX header is incomplete.")
    shape = tuple(int(n) for n in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = offset + dtype.itemsize * math.prod(shape)
    if len(data) != expected:
        raise ValueError(
            f"{path}: the IDX header announces shape {shape} ({expected} bytes) "
            f"but the file holds {len(data)} bytes."
        )
    array = np.frombuffer(data, dtype, offset=offset).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


_IDX_TYPES = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def _check_name(name):
    if not isinstance(name, str) or name.replace("-", "_") not in DATASET_NAMES:
        raise ValueError(
            f"Argument `name` must be one of {DATASET_NAMES}. Received: name={name!r}"
        )
    return name.replace("-", "_")


def subset(ds, index):
    """The examples of `ds` at `index`, as a new `Dataset`."""
    true_probs = None if ds.true_probs is None else ds.true_probs[index]
    return Dataset(ds.name, ds.x[index], ds.y[index], ds.num_classes, true_probs)


# Finding the data.


def _user_roots(data_dir):
    roots = [data_dir, os.environ.get(DATA_DIR_ENV)]
    return [Path(root).expanduser() for root in roots if root]


def _tfds_root():
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def _keras_datasets_dir():
    return Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser() / "datasets"


def _candidates(spec, data_dir):
    """Every place searched, in order, as (kind, path); kind: tfds or files."""
    places = []
    for root in _user_roots(data_dir):
        places.append(("tfds", root / spec.tfds_name))
        places += [("files", root / folder) for folder in spec.folders]
        places.append(("files", root))
    places.append(("tfds", _tfds_root() / spec.tfds_name))
    places += [("files", _keras_datasets_dir() / p) for p in spec.keras_cache]
    places += [("files", Path(p)) for p in spec.system_paths]
    return list(dict.fromkeys(places))


def _found_sources(spec, data_dir, raise_if_none):
    """The places that hold the data, in search order, as (kind, path)."""
    found = []
    for kind, path in _candidates(spec, data_dir):
        if kind == "tfds":
            version_dir = _tfds_version_dir(path)
            if version_dir is not None:
                found.append(("tfds", version_dir))
        elif _has_files(spec, path):
            found.append(("files", path))
    if not found and raise_if_none:
        raise DataNotFoundError(_not_found_message(spec, data_dir))
    return found


def _tfds_available():
    return importlib.util.find_spec("tensorflow_datasets") is not None


def _tfds_version_dir(path):
    """The newest prepared version folder of a tfds dataset, or None."""
    if not _tfds_available() or not path.is_dir():
        return None
    versions = [p.parent for p in path.glob("*/dataset_info.json")]
    versions = [p for p in versions if re.fullmatch(r"\d+\.\d+\.\d+", p.name)]
    if not versions:
        return None
    return max(versions, key=lambda p: tuple(int(n) for n in p.name.split(".")))


def _has_files(spec, path):
    if path.suffix == ".npz":
        return path.is_file()
    if not path.is_dir():
        return False
    if spec.file_format == "idx":
        return all(_idx_path(path, stem) is not None for stem in IDX_FILES)
    names = _CIFAR10_FILES if spec.file_format == "cifar10" else _CIFAR100_FILES
    return all((path / name).is_file() for name in names)


def _idx_path(folder, stem):
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def _not_found_message(spec, data_dir):
    lines = [
        f"Dataset {spec.name!r} was not found on this machine (nothing is "
        "downloaded at run time). Looked in, in this order:"
    ]
    for kind, path in _candidates(spec, data_dir):
        if kind == "tfds":
            lines.append(
                f"  - {path}/<version>/ (data prepared by tensorflow-datasets)"
            )
        else:
            lines.append(f"  - {path}")
    if not _tfds_available():
        lines.append(
            "  (tensorflow-datasets is not installed, so its folders were skipped)"
        )
    lines.append(f"Files expected there: {_expected_files(spec)}.")
    lines.append("To get the data, on a machine with network access if needed:")
    for how in spec.how_to_get:
        lines.append(f"  - {how}")
    lines.append(
        f"  - python -c \"import tensorflow_datasets as tfds; tfds.load('"
        f"{spec.tfds_name}')\" (writes ~/tensorflow_datasets/{spec.tfds_name}/; "
        "copy it to the same place here)"
    )
    lines.append(
        f"Or put the files in a folder DIR and pass --data-dir DIR, or set "
        f"{DATA_DIR_ENV}=DIR."
    )
    return "\n".join(lines)


def _expected_files(spec):
    if spec.file_format == "idx":
        names = ", ".join(f"{stem}[.gz]" for stem in IDX_FILES)
        return names + (" (or Keras' mnist.npz)" if spec.name == "mnist" else "")
    if spec.file_format == "cifar10":
        return "cifar-10-batches-py/ with " + ", ".join(_CIFAR10_FILES)
    return "cifar-100-python/ with " + ", ".join(_CIFAR100_FILES)


# Reading the data.


def _read_files(spec, path):
    """Returns (train_images, train_labels, test_images, test_labels)."""
    if path.suffix == ".npz":
        with np.load(path) as npz:
            return npz["x_train"], npz["y_train"], npz["x_test"], npz["y_test"]
    if spec.file_format == "idx":
        return tuple(read_idx(_idx_path(path, stem)) for stem in IDX_FILES)
    if spec.file_format == "cifar10":
        train = [_read_cifar_pickle(path / f, "labels") for f in _CIFAR10_FILES[:-1]]
        test_x, test_y = _read_cifar_pickle(path / "test_batch", "labels")
        train_x = np.concatenate([x for x, _ in train])
        train_y = np.concatenate([y for _, y in train])
        return train_x, train_y, test_x, test_y
    train_x, train_y = _read_cifar_pickle(path / "train", "fine_labels")
    test_x, test_y = _read_cifar_pickle(path / "test", "fine_labels")
    return train_x, train_y, test_x, test_y


def _read_cifar_pickle(path, label_key):
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(
            f"{path} is not a CIFAR batch: expected the keys 'data' and "
            f"{label_key!r}, found {sorted(batch)}."
        )
    images = np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32)
    return images.transpose(0, 2, 3, 1), np.asarray(batch[label_key])


def _read_tfds(version_dir):
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(version_dir)
    parts = []
    for split_name in ("train", "test"):
        dataset = builder.as_dataset(
            split=split_name, batch_size=-1, shuffle_files=False
        )
        features = tfds.as_numpy(dataset)
        parts += [features["image"], features["label"]]
    return tuple(parts)


def _image_dataset(spec, train_x, train_y, test_x, test_y, source):
    x = np.concatenate([_images(spec, train_x, source), _images(spec, test_x, source)])
    y = np.concatenate([np.ravel(train_y), np.ravel(test_y)]).astype(np.int64)
    if len(x) != len(y) or len(train_x) != len(np.ravel(train_y)):
        raise ValueError(
            f"{source}: {len(train_x)} + {len(test_x)} images but "
            f"{np.size(train_y)} + {np.size(test_y)} labels."
        )
    if y.size and (y.min() < 0 or y.max() >= spec.num_classes):
        raise ValueError(
            f"{source}: labels must lie in [0, {spec.num_classes}); found "
            f"{y.min()} to {y.max()}."
        )
    return Dataset(spec.name, x, y, spec.num_classes)


def _images(spec, images, source):
    images = np.asarray(images)
    if images.shape[1:] == (*spec.image_shape, 1):  # tfds keeps a channel axis
        images = images[..., 0]
    if images.shape[1:] != spec.image_shape:
        raise ValueError(
            f"{source}: images of shape {images.shape[1:]} found, expected "
            f"{spec.image_shape} for {spec.name!r}."
        )
    x = images.astype(np.float32)
    x /= 255.0
    return x
