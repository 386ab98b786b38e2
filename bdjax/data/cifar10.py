"""CIFAR-10 from the binary archive, prepared by a TFDS builder that needs no TensorFlow.

TFDS's own ``cifar10`` builder needs TensorFlow to prepare, so bdjax ships its own
builder, ``bdjax_cifar10``: it parses ``cifar-10-binary.tar.gz`` (plain bytes; the pickled
"python" archive is never read, since unpickling an untrusted copy can run code) with
numpy, writes ``array_record`` files and reads them back through a TFDS data source.

``tensorflow_datasets`` is imported only when CIFAR-10 is asked for, so the rest of bdjax
works without it.
"""

from __future__ import annotations

import os
import socket
import tarfile
import urllib.parse
import zlib
from pathlib import Path

import numpy as np

from bdjax.data.dataset import Dataset
from bdjax.errors import BdjaxError

BUILDER_NAME = "bdjax_cifar10"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE_NAME = "cifar-10-binary.tar.gz"
CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.247, 0.243, 0.261)

_MEMBER_DIR = "cifar-10-batches-bin/"
_TRAIN_MEMBERS = tuple(f"{_MEMBER_DIR}data_batch_{i}.bin" for i in range(1, 6))
_TEST_MEMBERS = (f"{_MEMBER_DIR}test_batch.bin",)
_META_MEMBER = f"{_MEMBER_DIR}batches.meta.txt"
_IMAGE_SHAPE = (32, 32, 3)
_RECORD_BYTES = 1 + 32 * 32 * 3  # one label byte, then the R, G and B planes
_FIX_HINT = (
    f"download {URL} and pass its path: "
    f"`bdjax attack --dataset cifar10 --data-archive PATH/{ARCHIVE_NAME}` "
    "(Python: load_cifar10(archive=PATH))"
)

_builder_class_cache = None


def default_data_dir() -> Path:
    """Returns where prepared datasets live: ``$BDJAX_DATA_DIR`` or ``~/.cache/bdjax/tfds``."""
    env = os.environ.get("BDJAX_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bdjax" / "tfds"


def load_cifar10(data_dir: str | None = None, archive: str | None = None) -> Dataset:
    """Loads CIFAR-10, preparing it from the binary archive on first use.

    The first call for a ``data_dir`` writes ``array_record`` files under
    ``data_dir/bdjax_cifar10/``; later calls read those and need no archive. The archive
    is taken, in order, from ``archive``, from the TFDS manual dir
    ``data_dir/downloads/manual/cifar-10-binary.tar.gz``, or downloaded from ``URL``.

    Args:
      data_dir: root folder for prepared datasets; defaults to ``default_data_dir()``.
      archive: path of ``cifar-10-binary.tar.gz``; only read when the data is not
        prepared yet.

    Returns:
      A ``Dataset`` named ``cifar10`` with uint8 ``[N, 32, 32, 3]`` images, int32 labels
      (train = data batches 1..5 in file order, test = the test batch in file order).

    Raises:
      BdjaxError: tensorflow-datasets is missing, the archive is missing or corrupt, or
        the download fails.
    """
    tfds = _import_tfds()
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    builder = _builder_class()(data_dir=os.fspath(root), archive=archive)
    if not builder.is_prepared():
        if archive is not None:
            _check_archive_exists(Path(archive))
        builder.download_and_prepare(
            file_format="array_record",
            # Explicit so the manual dir is always data_dir/downloads/manual.
            download_dir=os.fspath(root / "downloads"),
            # Our builder has no copy on TFDS's GCS bucket, so skip that network lookup.
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    x_train, y_train = _read_split(builder, "train")
    x_test, y_test = _read_split(builder, "test")
    return Dataset(
        name="cifar10",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=len(CLASS_NAMES),
        mean=MEAN,
        std=STD,
        flip=True,
        class_names=CLASS_NAMES,
        info={"source": builder.info.metadata.get("source", URL), "data_dir": os.fspath(root)},
    )


def _import_tfds():
    """Imports tensorflow_datasets on demand, turning its absence into a BdjaxError."""
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as exc:
        raise BdjaxError(
            f"cifar10 needs tensorflow-datasets, which could not be imported ({exc}); "
            "install it with: pip install 'bdjax[tfds]'."
        ) from exc
    return tfds


def _builder_class():
    """Returns the ``bdjax_cifar10`` builder class, defining it once per process."""
    global _builder_class_cache
    if _builder_class_cache is None:
        _builder_class_cache = _define_builder(_import_tfds())
    return _builder_class_cache


def _define_builder(tfds):
    """Defines the TFDS builder class; lives in a function because tfds is imported lazily."""
    # TFDS raises on a second registration of one name (e.g. after importlib.reload of
    # this module), so only the first definition in a process registers itself; later
    # ones work the same through their instances.
    from etils import epath  # pylint: disable=import-outside-toplevel  # a tfds dependency

    register = BUILDER_NAME not in tfds.list_builders(with_community_datasets=False)

    class BdjaxCifar10(tfds.core.GeneratorBasedBuilder, skip_registration=not register):
        """CIFAR-10 parsed from ``cifar-10-binary.tar.gz``, stored as array_record."""

        name = BUILDER_NAME
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "First release: binary archive, uint8 HWC images."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            f"Optional: place {ARCHIVE_NAME} (from {URL}) in the manual dir to skip the "
            "download."
        )

        # TFDS 4.9.x locates a builder's file through `importlib_resources`, a package it
        # only installs on Python < 3.9; pointing it at this file directly avoids that.
        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return epath.Path(__file__)

        def __init__(self, *, archive: str | os.PathLike | None = None, **kwargs):
            self._archive = None if archive is None else Path(archive).expanduser()
            super().__init__(**kwargs)

        def _info(self):
            return self.dataset_info_from_configs(
                description="CIFAR-10 (60,000 32x32 colour images in 10 classes) read "
                "from the binary distribution.",
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Tensor(shape=_IMAGE_SHAPE, dtype=np.uint8),
                        "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                    }
                ),
                supervised_keys=("image", "label"),
                # Keep file order so that example i is record i of the archive: TFDS
                # otherwise writes examples in key-hash order.
                disable_shuffling=True,
                homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
                # Provenance of the prepared files, written to metadata.json and
                # restored on later reads.
                metadata=tfds.core.MetadataDict(),
            )

        def _split_generators(self, dl_manager):
            path, source = self._locate_archive(dl_manager)
            # Parse everything before writing: a corrupt archive then fails before TFDS
            # has written any split, and its error is ours rather than a writer's.
            splits = _read_archive(path)
            self.info.metadata["source"] = source
            return {name: self._generate_examples(*arrays) for name, arrays in splits.items()}

        def _generate_examples(self, images, labels):
            for i in range(len(labels)):
                yield i, {"image": images[i], "label": int(labels[i])}

        def _locate_archive(self, dl_manager) -> tuple[Path, str]:
            """Returns the archive to read and its provenance (a path or the URL)."""
            if self._archive is not None:
                _check_archive_exists(self._archive)
                return self._archive, os.fspath(self._archive)
            manual = _manual_archive(dl_manager)
            if manual is not None:
                return manual, os.fspath(manual)
            return _download(dl_manager, Path(self.data_dir_root)), URL

    return BdjaxCifar10


def _manual_archive(dl_manager) -> Path | None:
    """Returns the archive in the TFDS manual dir, or None when it is not there."""
    try:
        manual_dir = dl_manager.manual_dir
    except (AssertionError, ValueError):  # TFDS's way of saying "no manual dir"
        return None
    path = Path(os.fspath(manual_dir)) / ARCHIVE_NAME
    return path if path.is_file() else None


def _download(dl_manager, root: Path) -> Path:
    """Downloads the archive through TFDS, failing fast and plainly when offline."""
    hint = f"{_FIX_HINT}, or place it at {root / 'downloads' / 'manual' / ARCHIVE_NAME}"
    # TFDS retries a failed request 10 times with exponential backoff (about 3.5 minutes
    # offline); one quick connection attempt first turns "no network" into a prompt error.
    try:
        socket.create_connection((urllib.parse.urlsplit(URL).hostname, 443), timeout=15).close()
    except OSError as exc:
        raise BdjaxError(f"cannot reach {URL} ({exc}); {hint}.") from exc
    try:
        return Path(os.fspath(dl_manager.download(URL)))
    except Exception as exc:  # any network/IO failure has the same remedy
        raise BdjaxError(
            f"could not download {URL} ({type(exc).__name__}: {exc}); {hint}."
        ) from exc


def _check_archive_exists(path: Path) -> None:
    if not path.is_file():
        raise BdjaxError(f"CIFAR-10 archive {path} does not exist; {_FIX_HINT}.")


def _read_archive(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Parses the binary archive into ``{"train": (x, y), "test": (x, y)}``.

    Members are read from the gzip tar stream; nothing is extracted to disk.
    """
    wanted = set(_TRAIN_MEMBERS + _TEST_MEMBERS)
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                # Re-packed copies often store "./cifar-10-batches-bin/...".
                name = member.name.removeprefix("./")
                if not member.isfile():
                    continue
                if name == _META_MEMBER:
                    _check_meta(path, tar.extractfile(member).read())
                elif name in wanted and name not in found:
                    found[name] = _parse_batch(path, name, tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise BdjaxError(
            f"CIFAR-10 archive {path} is not a readable tar.gz ({type(exc).__name__}: {exc}); "
            f"accepted: {ARCHIVE_NAME} from {URL}."
        ) from exc
    missing = sorted(wanted - found.keys())
    if missing:
        raise BdjaxError(
            f"CIFAR-10 archive {path} lacks {', '.join(missing)}; accepted: {ARCHIVE_NAME} "
            f"from {URL} (the binary version, not the python one)."
        )
    return {
        "train": _concat([found[name] for name in _TRAIN_MEMBERS]),
        "test": _concat([found[name] for name in _TEST_MEMBERS]),
    }


def _parse_batch(path: Path, member: str, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Decodes one batch file: records of a label byte then R, G, B planes (row-major)."""
    if not data or len(data) % _RECORD_BYTES:
        raise BdjaxError(
            f"CIFAR-10 archive {path}: {member} holds {len(data)} bytes; accepted: a "
            f"positive multiple of {_RECORD_BYTES} (one label byte + 3072 pixel bytes per "
            "image); the file is truncated or not CIFAR-10."
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _RECORD_BYTES)
    labels = records[:, 0].astype(np.int32)
    bad = np.flatnonzero(labels >= len(CLASS_NAMES))
    if bad.size:
        raise BdjaxError(
            f"CIFAR-10 archive {path}: {member} record {bad[0]} has label {labels[bad[0]]}; "
            f"accepted: 0..{len(CLASS_NAMES) - 1}."
        )
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _check_meta(path: Path, data: bytes) -> None:
    """Rejects an archive whose class list is not CIFAR-10's (e.g. a different dataset)."""
    names = tuple(line.strip() for line in data.decode("ascii", "replace").splitlines())
    names = tuple(name for name in names if name)
    if names != CLASS_NAMES:
        raise BdjaxError(
            f"CIFAR-10 archive {path}: {_META_MEMBER} lists classes {list(names)}; "
            f"accepted: {list(CLASS_NAMES)}."
        )


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def _read_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads a prepared split into ``uint8[N, 32, 32, 3]`` images and ``int32[N]`` labels."""
    source = builder.as_data_source(split=split)
    n = len(source)
    images = np.empty((n,) + _IMAGE_SHAPE, dtype=np.uint8)
    labels = np.empty((n,), dtype=np.int32)
    # Batched reads let array_record fetch many records per call instead of one.
    chunk = 4096
    for start in range(0, n, chunk):
        keys = list(range(start, min(start + chunk, n)))
        for i, example in zip(keys, source.__getitems__(keys)):
            images[i] = example["image"]
            labels[i] = example["label"]
    return images, labels
