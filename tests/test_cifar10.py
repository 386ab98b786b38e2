"""Tests for bdjax.data.cifar10 on a tiny archive written in the exact binary format."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bdjax.data import cifar10
from bdjax.errors import BdjaxError

REPO_ROOT = Path(__file__).resolve().parents[1]
PER_BATCH = 7  # records per training batch file; the real archive has 10,000
N_TEST = 5
RECORD = 3073
META = b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n"
TRAIN_FILES = [f"data_batch_{b}.bin" for b in range(1, 6)]


def make_records(seed: int = 0) -> dict[str, np.ndarray]:
    """Returns uint8[n, 3073] records per batch file, with known labels covering 0..9."""
    rng = np.random.default_rng(seed)
    records = {}
    for b, name in enumerate(TRAIN_FILES):
        rec = rng.integers(0, 256, (PER_BATCH, RECORD), dtype=np.uint8)
        rec[:, 0] = (b * PER_BATCH + np.arange(PER_BATCH)) % 10
        records[name] = rec
    rec = rng.integers(0, 256, (N_TEST, RECORD), dtype=np.uint8)
    rec[:, 0] = [9, 0, 4, 2, 7]
    records["test_batch.bin"] = rec
    return records


def write_archive(path: Path, members: dict[str, bytes]) -> Path:
    """Writes a gzip tar holding ``members`` under the ``cifar-10-batches-bin/`` prefix."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def members_of(records: dict[str, np.ndarray]) -> dict[str, bytes]:
    members = {name: rec.tobytes() for name, rec in records.items()}
    members["batches.meta.txt"] = META
    return members


def pixel(rec: np.ndarray, n: int, row: int, col: int, ch: int) -> int:
    """The byte of image n at (row, col, channel), read straight from the record layout."""
    return int(rec[n, 1 + ch * 1024 + row * 32 + col])


@pytest.fixture(scope="module")
def source():
    return make_records(seed=0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, source):
    """Prepares the tiny archive once; returns (dataset, data_dir, archive path)."""
    tmp = tmp_path_factory.mktemp("cifar10")
    archive = write_archive(tmp / "cifar-10-binary.tar.gz", members_of(source))
    data_dir = tmp / "tfds"
    ds = cifar10.load_cifar10(data_dir=str(data_dir), archive=str(archive))
    return ds, data_dir, archive


def test_shapes_dtypes_and_metadata(prepared):
    ds, data_dir, archive = prepared
    assert ds.name == "cifar10"
    assert ds.x_train.shape == (5 * PER_BATCH, 32, 32, 3)
    assert ds.x_test.shape == (N_TEST, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.x_test.dtype == np.uint8
    assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
    assert ds.y_train.shape == (5 * PER_BATCH,) and ds.y_test.shape == (N_TEST,)
    assert ds.num_classes == 10
    assert ds.mean == (0.4914, 0.4822, 0.4465)
    assert ds.std == (0.247, 0.243, 0.261)
    assert ds.flip is True
    assert ds.class_names == cifar10.CLASS_NAMES
    assert ds.class_names[0] == "airplane" and ds.class_names[9] == "truck"
    assert ds.info == {"source": str(archive), "data_dir": str(data_dir)}


def test_labels_and_train_order(prepared, source):
    ds, _, _ = prepared
    expected_train = np.concatenate([source[name][:, 0] for name in TRAIN_FILES])
    np.testing.assert_array_equal(ds.y_train, expected_train.astype(np.int32))
    np.testing.assert_array_equal(ds.y_test, [9, 0, 4, 2, 7])
    # Train is batches 1..5 in file order, each in record order.
    for b, name in enumerate(TRAIN_FILES):
        rec = source[name]
        for i in range(PER_BATCH):
            assert ds.y_train[b * PER_BATCH + i] == rec[i, 0]
            assert pixel(rec, i, 0, 0, 0) == ds.x_train[b * PER_BATCH + i, 0, 0, 0]


@pytest.mark.parametrize(
    "n, row, col, ch",
    [(0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (3, 0, 31, 0), (4, 31, 0, 2),
     (2, 31, 31, 1), (1, 5, 17, 2), (4, 16, 3, 1)],
)
def test_specific_test_pixels(prepared, source, n, row, col, ch):
    ds, _, _ = prepared
    assert ds.x_test[n, row, col, ch] == pixel(source["test_batch.bin"], n, row, col, ch)


def test_specific_train_pixels(prepared, source):
    ds, _, _ = prepared
    # Batch 3, record 6 is train index 2 * 7 + 6 = 20; batch 5, record 0 is index 28.
    rec3, rec5 = source["data_batch_3.bin"], source["data_batch_5.bin"]
    for row, col, ch in [(0, 0, 0), (0, 1, 0), (1, 0, 0), (10, 20, 1), (31, 31, 2)]:
        assert ds.x_train[20, row, col, ch] == pixel(rec3, 6, row, col, ch)
        assert ds.x_train[28, row, col, ch] == pixel(rec5, 0, row, col, ch)


def test_full_arrays_match_source_bytes(prepared, source):
    ds, _, _ = prepared

    def hwc(rec):
        # Channel-major planes (R, G, B), each row-major 32x32, to [N, H, W, C].
        return rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    expected_train = np.concatenate([hwc(source[name]) for name in TRAIN_FILES])
    np.testing.assert_array_equal(ds.x_train, expected_train)
    np.testing.assert_array_equal(ds.x_test, hwc(source["test_batch.bin"]))
    # The same check with index arithmetic alone, independent of reshape/transpose.
    rows, cols, chs = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    offsets = 1 + chs * 1024 + rows * 32 + cols
    rec = source["test_batch.bin"]
    for n in range(N_TEST):
        np.testing.assert_array_equal(ds.x_test[n], rec[n][offsets])


def test_second_call_reads_prepared_data_without_archive(prepared):
    ds, data_dir, archive = prepared
    again = cifar10.load_cifar10(data_dir=str(data_dir))
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    np.testing.assert_array_equal(again.y_train, ds.y_train)
    np.testing.assert_array_equal(again.x_test, ds.x_test)
    np.testing.assert_array_equal(again.y_test, ds.y_test)
    # Provenance survives the round trip through the prepared files.
    assert again.info["source"] == str(archive)
    # An archive path is only read when preparing, so a stale one is harmless here.
    stale = cifar10.load_cifar10(data_dir=str(data_dir), archive=str(data_dir / "gone.tar.gz"))
    np.testing.assert_array_equal(stale.y_test, ds.y_test)


def test_default_data_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BDJAX_DATA_DIR", str(tmp_path / "x"))
    assert cifar10.default_data_dir() == tmp_path / "x"
    monkeypatch.delenv("BDJAX_DATA_DIR")
    assert cifar10.default_data_dir() == Path.home() / ".cache" / "bdjax" / "tfds"


def test_missing_archive_names_path_and_fix(tmp_path):
    missing = tmp_path / "nowhere" / "cifar-10-binary.tar.gz"
    with pytest.raises(BdjaxError) as err:
        cifar10.load_cifar10(data_dir=str(tmp_path / "tfds"), archive=str(missing))
    message = str(err.value)
    assert str(missing) in message
    assert "--data-archive" in message and cifar10.URL in message


def test_archive_in_manual_dir_is_used(tmp_path, source):
    manual = tmp_path / "tfds" / "downloads" / "manual"
    manual.mkdir(parents=True)
    write_archive(manual / "cifar-10-binary.tar.gz", members_of(source))
    ds = cifar10.load_cifar10(data_dir=str(tmp_path / "tfds"))
    np.testing.assert_array_equal(ds.y_test, [9, 0, 4, 2, 7])
    assert ds.info["source"] == str(manual / "cifar-10-binary.tar.gz")


def test_offline_without_archive_fails_fast_with_the_fix(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    # Never touch the network from tests: simulate a machine without it.
    monkeypatch.setattr(cifar10.socket, "create_connection", offline)
    with pytest.raises(BdjaxError) as err:
        cifar10.load_cifar10(data_dir=str(tmp_path / "tfds"))
    message = str(err.value)
    assert cifar10.URL in message and "--data-archive" in message
    assert str(tmp_path / "tfds" / "downloads" / "manual" / "cifar-10-binary.tar.gz") in message


def _load_corrupt(tmp_path, members) -> str:
    archive = write_archive(tmp_path / "bad.tar.gz", members)
    with pytest.raises(BdjaxError) as err:
        cifar10.load_cifar10(data_dir=str(tmp_path / "tfds"), archive=str(archive))
    message = str(err.value)
    assert str(archive) in message
    return message


def test_truncated_batch_is_rejected(tmp_path, source):
    members = members_of(source)
    members["data_batch_3.bin"] = members["data_batch_3.bin"][:-100]
    message = _load_corrupt(tmp_path, members)
    assert "data_batch_3.bin" in message and "3073" in message


def test_label_out_of_range_is_rejected(tmp_path, source):
    bad = source["test_batch.bin"].copy()
    bad[3, 0] = 10
    members = members_of(source)
    members["test_batch.bin"] = bad.tobytes()
    message = _load_corrupt(tmp_path, members)
    assert "test_batch.bin" in message and "record 3" in message and "label 10" in message


def test_missing_member_is_rejected(tmp_path, source):
    members = members_of(source)
    del members["data_batch_5.bin"]
    assert "data_batch_5.bin" in _load_corrupt(tmp_path, members)


def test_wrong_class_list_is_rejected(tmp_path, source):
    members = members_of(source)
    members["batches.meta.txt"] = b"apple\naquarium_fish\n"
    assert "batches.meta.txt" in _load_corrupt(tmp_path, members)


def test_not_a_tar_is_rejected(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(BdjaxError, match="not a readable tar.gz") as err:
        cifar10.load_cifar10(data_dir=str(tmp_path / "tfds"), archive=str(archive))
    assert str(archive) in str(err.value)


def test_truncated_gzip_is_rejected(tmp_path, source):
    whole = write_archive(tmp_path / "whole.tar.gz", members_of(source))
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(BdjaxError, match="not a readable tar.gz") as err:
        cifar10.load_cifar10(data_dir=str(tmp_path / "tfds"), archive=str(archive))
    assert str(archive) in str(err.value)


def test_dot_slash_member_names_are_accepted(tmp_path, source):
    archive = tmp_path / "repacked.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in members_of(source).items():
            info = tarfile.TarInfo(f"./cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = cifar10.load_cifar10(data_dir=str(tmp_path / "tfds"), archive=str(archive))
    np.testing.assert_array_equal(ds.y_test, [9, 0, 4, 2, 7])


def test_failed_prepare_leaves_no_partial_data(tmp_path, source):
    members = members_of(source)
    members["test_batch.bin"] = members["test_batch.bin"][:-1]
    _load_corrupt(tmp_path, members)
    good = write_archive(tmp_path / "good.tar.gz", members_of(source))
    ds = cifar10.load_cifar10(data_dir=str(tmp_path / "tfds"), archive=str(good))
    assert len(ds.x_test) == N_TEST


def test_missing_tfds_names_the_fix(monkeypatch, tmp_path):
    # A None entry makes `import tensorflow_datasets` raise ImportError.
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(BdjaxError, match=r"pip install 'bdjax\[tfds\]'"):
        cifar10.load_cifar10(data_dir=str(tmp_path))


def test_builder_redefinition_does_not_raise():
    import tensorflow_datasets as tfds

    first = cifar10._builder_class()
    second = cifar10._define_builder(tfds)  # e.g. after importlib.reload of the module
    assert first.name == second.name == cifar10.BUILDER_NAME
    assert cifar10.BUILDER_NAME in tfds.list_builders(with_community_datasets=False)


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


def test_import_does_not_import_tfds():
    result = _run_python(
        """
        import sys
        import bdjax.data.cifar10
        assert "tensorflow_datasets" not in sys.modules, "tfds imported eagerly"
        """
    )
    assert result.returncode == 0, result.stderr


def test_prepare_and_read_never_import_tensorflow(tmp_path, source):
    archive = write_archive(tmp_path / "cifar-10-binary.tar.gz", members_of(source))
    result = _run_python(
        f"""
        import sys
        from bdjax.data.cifar10 import load_cifar10
        ds = load_cifar10(data_dir={str(tmp_path / "tfds")!r}, archive={str(archive)!r})
        ds = load_cifar10(data_dir={str(tmp_path / "tfds")!r})
        assert len(ds.x_train) == {5 * PER_BATCH}
        loaded = [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
        assert not loaded, loaded
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
