"""
Tests of pyro_wakesleep.datasets: binarized MNIST (compact .npz, .amat text, download), plain
MNIST and dynamic binarization, the shipped digits subset, the bars problem, load_dataset.

No test uses the network: sockets are disabled for this module, and downloads are served from
local file:// URLs or from memory by an opener installed with urllib.request.install_opener.
Tests that need the project's shared data (../shared/data relative to the repository root, see
its SOURCES.md) skip when it is absent.
"""

import io
import math
import socket
import sys
import urllib.error
import urllib.request
import urllib.response
import zipfile
from email.message import Message
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_wakesleep import datasets
from pyro_wakesleep.datasets import (
    BINARIZED_MNIST_SHA256,
    BINARIZED_MNIST_URL,
    Bars,
    DatasetError,
    binarized_mnist_test_labels,
    default_cache_dir,
    download_binarized_mnist,
    dynamic_binarization,
    load_binarized_mnist,
    load_dataset,
    load_digits,
    load_mnist,
    packed_sha256,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).parents[1].parent / "shared" / "data"
BINARIZED = SHARED / "binarized_mnist.npz"
MNIST = SHARED / "mnist.npz"
needs_binarized = pytest.mark.skipif(
    not BINARIZED.exists(), reason=f"shared data file {BINARIZED} is absent (see SOURCES.md)"
)
needs_mnist = pytest.mark.skipif(
    not MNIST.exists(), reason=f"shared data file {MNIST} is absent (see SOURCES.md)"
)
SPLITS = ("train", "valid", "test")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """No network, and a private cache folder instead of ~/.cache."""

    def refuse(*args, **kwargs):
        raise AssertionError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv(datasets.CACHE_ENV_VAR, str(tmp_path_factory.mktemp("default-cache")))


@pytest.fixture(scope="module")
def shared_rows():
    """The shared binarized MNIST as uint8 0/1 arrays (N, 784) straight from numpy."""
    if not BINARIZED.exists():
        pytest.skip(f"shared data file {BINARIZED} is absent (see SOURCES.md)")
    with np.load(BINARIZED) as f:
        return {s: np.unpackbits(f[s], axis=1)[:, :784] for s in SPLITS}


# ---------------------------------------------------------------------------- fixture writers


def amat_bytes(rows, *, newline=b"\n", trailing_space=False, final_newline=True, floats=False):
    """The text of a .amat file: one row of space-separated 0/1 values per line."""
    rows = np.asarray(rows, dtype=np.uint8)
    if not floats and not trailing_space and newline == b"\n":
        grid = np.full((len(rows), 2 * rows.shape[1]), ord(" "), dtype=np.uint8)
        grid[:, 0::2] = rows + ord("0")
        grid[:, -1] = ord("\n")
        text = grid.tobytes()
    else:
        fmt = "{:.1f}" if floats else "{:d}"
        lines = [" ".join(fmt.format(int(v)) for v in row).encode() for row in rows]
        end = b" " + newline if trailing_space else newline
        text = end.join(lines) + end
    return text if final_newline else text.rstrip(b"\n")


def write_amat(path, rows, **kwargs):
    path.write_bytes(amat_bytes(rows, **kwargs))
    return path


def write_amat_dir(folder, splits):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_amat(folder / f"binarized_mnist_{split}.amat", rows)
    return folder


def write_compact(path, splits, **extra):
    np.savez_compressed(
        path, **{s: np.packbits(r.astype(np.uint8), axis=1) for s, r in splits.items()}, **extra
    )
    return path


def random_splits(seed=0, sizes=(7, 5, 3)):
    rng = np.random.default_rng(seed)
    return {s: (rng.random((n, 784)) < 0.3).astype(np.uint8) for s, n in zip(SPLITS, sizes)}


def rows_sha256(rows):
    return packed_sha256(np.packbits(rows.astype(np.uint8), axis=1))


def assert_one_line_naming(err, path):
    message = str(err.value)
    assert str(path) in message, message
    assert "\n" not in message
    assert isinstance(err.value, ValueError)


# ---------------------------------------------------------------------------- the shared file


@needs_binarized
def test_shared_binarized_mnist_shapes_values_and_means():
    data = load_binarized_mnist(BINARIZED)
    assert set(data) == set(SPLITS)
    # Mean pixel values as printed (6 decimals) in SOURCES.md, so they agree to 5e-7.
    means = {"train": 0.130562, "valid": 0.131127, "test": 0.132512}
    for split, n in datasets.BINARIZED_MNIST_SIZES.items():
        x = data[split]
        assert x.shape == (n, 784) and x.dtype == torch.float32
        assert ((x == 0) | (x == 1)).all() and x.max() == 1
        assert abs(x.double().mean().item() - means[split]) <= 5e-7


@needs_binarized
def test_hard_coded_checksums_are_those_of_the_shared_file():
    with np.load(BINARIZED) as f:
        assert {s: packed_sha256(f[s]) for s in SPLITS} == BINARIZED_MNIST_SHA256


# ---------------------------------------------------------------------------- .amat text


@needs_binarized
def test_amat_folder_and_compact_npz_give_the_same_rows(tmp_path, shared_rows):
    subset = {s: shared_rows[s][:200] for s in SPLITS}
    folder = write_amat_dir(tmp_path / "amat", subset)
    compact = write_compact(tmp_path / "subset.npz", subset, shape=np.array([28, 28]))
    from_text = load_binarized_mnist(folder, check_sizes=False)
    from_npz = load_binarized_mnist(compact, check_sizes=False)
    for s in SPLITS:
        assert from_text[s].dtype == torch.float32
        assert torch.equal(from_text[s], from_npz[s])
        assert np.array_equal(from_text[s].numpy(), subset[s])


@needs_binarized
def test_full_size_single_amat_file_is_keyed_by_its_split(tmp_path, shared_rows):
    file = write_amat(tmp_path / "binarized_mnist_test.amat", shared_rows["test"])
    data = load_binarized_mnist(file)  # the full 10,000 rows pass the size check
    assert list(data) == ["test"]
    assert np.array_equal(data["test"].numpy(), shared_rows["test"])


@pytest.mark.parametrize(
    "layout",
    [
        {"newline": b"\r\n"},
        {"trailing_space": True},
        {"final_newline": False},
        {"floats": True},
    ],
    ids=["crlf", "trailing-space", "no-final-newline", "floats"],
)
def test_amat_layout_variants_parse_alike(tmp_path, layout):
    rows = random_splits()["train"]
    file = write_amat(tmp_path / "binarized_mnist_train.amat", rows, **layout)
    data = load_binarized_mnist(file, check_sizes=False)
    assert np.array_equal(data["train"].numpy(), rows)


def test_amat_blank_lines_are_skipped(tmp_path):
    rows = random_splits()["valid"]
    text = amat_bytes(rows[:2]) + b"\n  \n" + amat_bytes(rows[2:])
    (tmp_path / "x_valid.amat").write_bytes(text)
    data = load_binarized_mnist(tmp_path / "x_valid.amat", check_sizes=False)
    assert np.array_equal(data["valid"].numpy(), rows)


def test_single_amat_without_split_name_is_keyed_data(tmp_path):
    rows = random_splits()["test"]
    data = load_binarized_mnist(write_amat(tmp_path / "digits.amat", rows))
    assert list(data) == ["data"] and np.array_equal(data["data"].numpy(), rows)


def test_folder_with_compact_npz(tmp_path):
    splits = random_splits()
    write_compact(tmp_path / "binarized_mnist.npz", splits)
    data = load_binarized_mnist(tmp_path, check_sizes=False)
    assert all(np.array_equal(data[s].numpy(), splits[s]) for s in SPLITS)


def test_unpacked_npz_is_accepted(tmp_path):
    splits = random_splits()
    np.savez(tmp_path / "plain.npz", **splits)
    data = load_binarized_mnist(tmp_path / "plain.npz", check_sizes=False)
    assert all(np.array_equal(data[s].numpy(), splits[s]) for s in SPLITS)


def test_matlab_file_named_amat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rows = random_splits()["train"]
    file = tmp_path / "binarized_mnist_train.amat"
    with open(file, "wb") as f:  # savemat would append .mat to a str name
        scipy_io.savemat(f, {"X": rows})
    data = load_binarized_mnist(file, check_sizes=False)
    assert np.array_equal(data["train"].numpy(), rows)


# ---------------------------------------------------------------------------- malformed files


def _wrong_row_length(tmp_path):
    rows = random_splits()["train"]
    text = amat_bytes(rows[:2]) + amat_bytes(rows[2:3, :783]) + amat_bytes(rows[3:])
    return tmp_path / "binarized_mnist_train.amat", text, "line 3 has 783 values"


def _value_two(tmp_path):
    rows = random_splits()["train"]
    rows[4, 100] = 2
    return tmp_path / "binarized_mnist_train.amat", amat_bytes(rows), "line 5 value 101 is '2'"


def _not_a_number(tmp_path):
    text = amat_bytes(random_splits()["train"]).replace(b"1", b"x", 1)
    return tmp_path / "binarized_mnist_train.amat", text, "not a number"


def _empty(tmp_path):
    return tmp_path / "binarized_mnist_train.amat", b"\n\n", "no rows"


def _truncated_npz(tmp_path):
    write_compact(tmp_path / "full.npz", random_splits())
    data = (tmp_path / "full.npz").read_bytes()
    return tmp_path / "truncated.npz", data[: len(data) // 2], "cannot be read as an .npz"


def _npz_missing_split(tmp_path):
    splits = random_splits()
    del splits["valid"]
    write_compact(tmp_path / "tmp.npz", splits)
    return tmp_path / "missing.npz", (tmp_path / "tmp.npz").read_bytes(), "no array 'valid'"


def _npz_wrong_width(tmp_path):
    buffer = io.BytesIO()
    splits = {s: np.zeros((3, 97), np.uint8) for s in SPLITS}
    np.savez(buffer, **splits)
    return tmp_path / "narrow.npz", buffer.getvalue(), "shape (3, 97)"


def _npz_value_two(tmp_path):
    buffer = io.BytesIO()
    splits = {s: np.zeros((3, 784), np.uint8) for s in SPLITS}
    splits["valid"][2, 5] = 2
    np.savez(buffer, **splits)
    return tmp_path / "unpacked.npz", buffer.getvalue(), "row 2 pixel 5 is 2"


def _wrong_extension(tmp_path):
    return tmp_path / "binarized_mnist.txt", b"0 1", "unsupported file type '.txt'"


def _text_named_npz(tmp_path):
    return tmp_path / "text.npz", b"0 1 0 1\n", "cannot be read as an .npz"


MALFORMED = [
    _wrong_row_length,
    _value_two,
    _not_a_number,
    _empty,
    _truncated_npz,
    _npz_missing_split,
    _npz_wrong_width,
    _npz_value_two,
    _wrong_extension,
    _text_named_npz,
]


@pytest.mark.parametrize("make", MALFORMED, ids=[m.__name__.strip("_") for m in MALFORMED])
def test_malformed_file_raises_dataset_error_naming_it(tmp_path, make):
    path, content, problem = make(tmp_path)
    path.write_bytes(content)
    with pytest.raises(DatasetError) as err:
        load_binarized_mnist(path, check_sizes=False)
    assert_one_line_naming(err, path)
    assert problem in str(err.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "binarized_mnist.npz"
    with pytest.raises(DatasetError, match="file not found") as err:
        load_binarized_mnist(path)
    assert_one_line_naming(err, path)


def test_folder_missing_an_amat_file(tmp_path):
    splits = random_splits()
    del splits["valid"]
    write_amat_dir(tmp_path, splits)
    with pytest.raises(DatasetError, match="binarized_mnist_valid.amat") as err:
        load_binarized_mnist(tmp_path, check_sizes=False)
    assert_one_line_naming(err, tmp_path)


def test_wrong_number_of_rows_fails_the_size_check(tmp_path):
    path = write_compact(tmp_path / "small.npz", random_splits())
    with pytest.raises(DatasetError, match="'train' has 7 rows, expected 50000") as err:
        load_binarized_mnist(path)
    assert_one_line_naming(err, path)
    assert "check_sizes=False" in str(err.value)


def test_no_path_and_empty_cache(tmp_path):
    with pytest.raises(DatasetError, match="download=True") as err:
        load_binarized_mnist(cache_dir=tmp_path)
    assert_one_line_naming(err, tmp_path / "binarized_mnist.npz")


@pytest.mark.parametrize(
    "arrays, problem",
    [
        ({"x_train": np.zeros((2, 28, 28), np.uint8)}, "no array 'y_train'"),
        (
            {
                "x_train": np.zeros((2, 28, 28), np.float32),
                "y_train": np.zeros(2, np.uint8),
                "x_test": np.zeros((1, 28, 28), np.uint8),
                "y_test": np.zeros(1, np.uint8),
            },
            "x_train is float32",
        ),
        (
            {
                "x_train": np.zeros((2, 28, 28), np.uint8),
                "y_train": np.array([0, 10], np.uint8),
                "x_test": np.zeros((1, 28, 28), np.uint8),
                "y_test": np.zeros(1, np.uint8),
            },
            "outside 0..9",
        ),
    ],
    ids=["missing-key", "wrong-dtype", "bad-label"],
)
def test_malformed_mnist(tmp_path, arrays, problem):
    path = tmp_path / "mnist.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=problem) as err:
        load_mnist(path, check_sizes=False)
    assert_one_line_naming(err, path)


# ---------------------------------------------------------------------------- download


@pytest.fixture
def served(tmp_path):
    """Small .amat files in a local folder, its file:// URL, and their checksums."""
    splits = random_splits(seed=1)
    folder = write_amat_dir(tmp_path / "server", splits)
    sums = {s: rows_sha256(r) for s, r in splits.items()}
    return splits, folder.as_uri() + "/", sums


class CountingFileHandler(urllib.request.FileHandler):
    """Opens file:// URLs as usual and records each one."""

    def __init__(self):
        super().__init__()
        self.requested = []

    def file_open(self, req):
        self.requested.append(req.full_url)
        return super().file_open(req)


class PagesHandler(urllib.request.BaseHandler):
    """Serves http:// URLs from memory (url -> bytes), before any real HTTP handler, and
    records each request."""

    handler_order = 100

    def __init__(self, pages):
        self.pages = pages
        self.requested = []

    def http_open(self, req):
        url = req.full_url
        self.requested.append(url)
        if url not in self.pages:
            raise urllib.error.URLError(f"{url} is not served")
        response = urllib.response.addinfourl(io.BytesIO(self.pages[url]), Message(), url, 200)
        response.msg = "OK"
        return response


@pytest.fixture
def install_opener():
    """Install a urllib opener built from the given handlers, the one ``urlopen`` uses; the
    default opener is restored afterwards."""

    def install(*handlers):
        urllib.request.install_opener(urllib.request.build_opener(*handlers))
        return handlers

    yield install
    urllib.request.install_opener(None)


def test_download_from_a_local_url(tmp_path, served):
    splits, url, sums = served
    cache = tmp_path / "cache"
    path = download_binarized_mnist(cache, base_url=url, checksums=sums)
    assert path == cache / "binarized_mnist.npz"
    assert sorted(p.name for p in cache.iterdir()) == ["binarized_mnist.npz"]  # no leftovers
    data = load_binarized_mnist(path, check_sizes=False)
    assert all(np.array_equal(data[s].numpy(), splits[s]) for s in SPLITS)
    with np.load(path) as f:
        assert f["shape"].tolist() == [28, 28]


def test_cache_hit_does_not_download_again(tmp_path, install_opener, served):
    splits, url, sums = served
    cache = tmp_path / "cache"
    (opener,) = install_opener(CountingFileHandler())
    calls = opener.requested
    first = download_binarized_mnist(cache, base_url=url, checksums=sums)
    assert len(calls) == 3
    before = first.read_bytes()
    again = download_binarized_mnist(cache, base_url=url, checksums=sums)
    assert again == first and len(calls) == 3 and first.read_bytes() == before
    # load_binarized_mnist with no path reads the cache without downloading
    data = load_binarized_mnist(cache_dir=cache, download=True, check_sizes=False)
    assert len(calls) == 3 and np.array_equal(data["valid"].numpy(), splits["valid"])


def test_corrupt_cache_entry_is_replaced(tmp_path, served):
    splits, url, sums = served
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "binarized_mnist.npz").write_bytes(b"garbage")
    path = download_binarized_mnist(cache, base_url=url, checksums=sums)
    assert np.array_equal(
        load_binarized_mnist(path, check_sizes=False)["test"].numpy(), splits["test"]
    )


@pytest.mark.parametrize("bad_split", SPLITS)
def test_checksum_mismatch_raises_and_leaves_no_file(tmp_path, served, bad_split):
    _, url, sums = served
    sums = dict(sums, **{bad_split: "0" * 64})
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match=f"checksum mismatch for split '{bad_split}'") as err:
        download_binarized_mnist(cache, base_url=url, checksums=sums)
    assert_one_line_naming(err, url + f"binarized_mnist_{bad_split}.amat")
    assert list(cache.iterdir()) == []  # no npz, no temporary files


def test_fixture_data_fails_the_real_checksums(tmp_path, served):
    _, url, _ = served
    with pytest.raises(DatasetError, match="checksum mismatch for split 'train'"):
        download_binarized_mnist(tmp_path / "cache", base_url=url)
    assert list((tmp_path / "cache").iterdir()) == []


def test_failed_download_leaves_no_file(tmp_path, served):
    _, url, sums = served
    (tmp_path / "server" / "binarized_mnist_valid.amat").unlink()
    with pytest.raises(DatasetError, match="download failed") as err:
        download_binarized_mnist(tmp_path / "cache", base_url=url, checksums=sums)
    assert_one_line_naming(err, url + "binarized_mnist_valid.amat")
    assert list((tmp_path / "cache").iterdir()) == []


def test_default_cache_folder_comes_from_the_environment(tmp_path, monkeypatch, served):
    splits, url, sums = served
    monkeypatch.setenv(datasets.CACHE_ENV_VAR, str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    assert download_binarized_mnist(base_url=url, checksums=sums) == (
        tmp_path / "env-cache" / "binarized_mnist.npz"
    )
    monkeypatch.delenv(datasets.CACHE_ENV_VAR)
    assert default_cache_dir() == Path.home() / ".cache" / "pyro_wakesleep"


def test_load_with_download_uses_the_module_url_and_checksums(tmp_path, install_opener):
    """The small fixture rows served at the real URLs: load_binarized_mnist(download=True)
    fetches BINARIZED_MNIST_URL and refuses the rows by BINARIZED_MNIST_SHA256."""
    splits = random_splits(seed=1)
    pages = {
        BINARIZED_MNIST_URL + f"binarized_mnist_{s}.amat": amat_bytes(splits[s]) for s in SPLITS
    }
    (server,) = install_opener(PagesHandler(pages))
    cache = tmp_path / "c"
    with pytest.raises(DatasetError, match="checksum mismatch for split 'train'") as err:
        load_binarized_mnist(cache_dir=cache, download=True, check_sizes=False)
    assert_one_line_naming(err, BINARIZED_MNIST_URL + "binarized_mnist_train.amat")
    assert f"expected {BINARIZED_MNIST_SHA256['train']}" in str(err.value)
    assert f"packed rows {rows_sha256(splits['train'])}" in str(err.value)
    assert server.requested == [BINARIZED_MNIST_URL + "binarized_mnist_train.amat"]
    assert list(cache.iterdir()) == []


@needs_binarized
def test_full_download_from_the_real_urls_with_a_fake_opener(tmp_path, install_opener, shared_rows):
    """The real URLs and the hard-coded checksums, served from memory: the .amat text of the
    shared file. The cached npz holds exactly the shared arrays."""
    pages = {
        BINARIZED_MNIST_URL + f"binarized_mnist_{s}.amat": amat_bytes(shared_rows[s])
        for s in SPLITS
    }
    (server,) = install_opener(PagesHandler(pages))
    path = download_binarized_mnist(tmp_path / "cache")
    assert server.requested == list(pages)
    with np.load(path) as got, np.load(BINARIZED) as want:
        for s in SPLITS:
            assert np.array_equal(got[s], want[s])


# ---------------------------------------------------------------------------- MNIST, labels


@needs_mnist
def test_load_mnist_shared_file():
    m = load_mnist(MNIST)
    assert m["x_train"].shape == (60000, 28, 28) and m["x_train"].dtype == torch.uint8
    assert m["x_test"].shape == (10000, 28, 28) and m["y_test"].dtype == torch.int64
    # means/255 printed to 5 decimals in SOURCES.md
    assert abs(m["x_train"].double().mean().item() / 255 - 0.13066) <= 5e-6
    assert abs(m["x_test"].double().mean().item() / 255 - 0.13251) <= 5e-6
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert torch.bincount(m["y_test"]).tolist() == counts


@needs_mnist
@needs_binarized
def test_test_labels_align_binarized_rows_with_mnist(shared_rows):
    labels = binarized_mnist_test_labels(MNIST)
    m = load_mnist(MNIST)
    assert torch.equal(labels, torch.sort(m["y_test"]).values)
    # Row i is MNIST test image argsort(y_test, stable)[i]: no 1 where that image is 0, no 0
    # where it is 255 (Bernoulli(pixel/255) can do neither).
    order = np.argsort(m["y_test"].numpy(), kind="stable")
    x = m["x_test"].numpy()[order].reshape(-1, 784)
    bits = shared_rows["test"]
    assert not (bits[x == 0] == 1).any() and not (bits[x == 255] == 0).any()


# ---------------------------------------------------------------------------- dynamic binarization


def test_dynamic_binarization_statistics():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2000, 28, 28), np.uint8))
    g = torch.Generator().manual_seed(0)
    x = dynamic_binarization(images, generator=g)
    assert x.shape == (2000, 784) and x.dtype == torch.float32
    assert set(torch.unique(x).tolist()) <= {0.0, 1.0}
    p = images.reshape(2000, 784).double() / 255
    assert (x[p == 0] == 0).all() and (x[p == 1] == 1).all()
    # The bits are independent Bernoulli(p): the sum has variance sum p(1 - p), so the mean has
    # standard error sqrt(sum p(1 - p)) / n; 5 standard errors fail a correct sampler w.p. ~6e-7.
    se = (p * (1 - p)).sum().sqrt().item() / p.numel()
    assert abs(x.double().mean().item() - p.mean().item()) <= 5 * se
    assert not torch.equal(x, dynamic_binarization(images, generator=g))  # fresh each call
    assert torch.equal(x, dynamic_binarization(images, torch.Generator().manual_seed(0)))


def test_dynamic_binarization_per_intensity():
    levels = torch.arange(256, dtype=torch.uint8)
    k = 4000
    x = dynamic_binarization(levels.repeat(k, 1), torch.Generator().manual_seed(1))
    freq = x.double().mean(0)
    p = levels.double() / 255
    # Per intensity, the frequency over k draws has standard error sqrt(p(1 - p) / k); 5 SE
    # (plus 1/k for the discreteness at p near 0 or 1) over 256 levels fails w.p. ~1e-4.
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / k).sqrt() + 1 / k).all()


def test_dynamic_binarization_inputs():
    probs = torch.tensor([[0.0, 1.0, 0.5]])
    x = dynamic_binarization(probs)
    assert x[0, 0] == 0 and x[0, 1] == 1
    assert dynamic_binarization(np.zeros((3, 28, 28), np.uint8)).shape == (3, 784)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dynamic_binarization(torch.tensor([[0.5, 2.0]]))
    with pytest.raises(ValueError, match="0..255"):
        dynamic_binarization(torch.tensor([[0, 300]]))


# ---------------------------------------------------------------------------- shipped digits


def test_shipped_digits_load_through_importlib_resources():
    resource = resources.files("pyro_wakesleep.data").joinpath("digits.npz")
    assert resource.is_file()
    assert len(resource.read_bytes()) < 1_000_000
    d = load_digits()
    assert d["train"].shape == (3000, 784) and d["train"].dtype == torch.float32
    assert d["test"].shape == (1000, 784) and d["test"].dtype == torch.float32
    assert d["test_labels"].shape == (1000,) and d["test_labels"].dtype == torch.int64
    assert set(torch.unique(d["train"]).tolist()) == {0.0, 1.0}
    counts = torch.bincount(d["test_labels"], minlength=10)
    assert len(counts) == 10 and counts.min() >= 80  # every digit, ~100 each
    assert torch.equal(d["test_labels"], torch.sort(d["test_labels"]).values)


@needs_binarized
def test_shipped_digits_are_rows_of_the_shared_file(shared_rows):
    d = load_digits()
    assert np.array_equal(d["train"].numpy(), shared_rows["train"][:3000])
    assert np.array_equal(d["test"].numpy(), shared_rows["test"][::10])


@needs_mnist
def test_shipped_digit_labels():
    labels = np.sort(load_mnist(MNIST)["y_test"].numpy())[::10]
    assert np.array_equal(load_digits()["test_labels"].numpy(), labels)


@needs_mnist
@needs_binarized
def test_make_digits_reproduces_the_shipped_arrays(tmp_path):
    from pyro_wakesleep.data.make_digits import make_digits

    out = make_digits(BINARIZED, MNIST, tmp_path / "digits.npz")
    shipped = resources.files("pyro_wakesleep.data").joinpath("digits.npz").read_bytes()
    with np.load(out) as new, np.load(io.BytesIO(shipped)) as old:
        assert sorted(new.files) == sorted(old.files)
        for key in new.files:
            assert np.array_equal(new[key], old[key]) and new[key].dtype == old[key].dtype


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib needs Python 3.11")
def test_package_data_ships_the_digits():
    import fnmatch

    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["pyro_wakesleep.data"]
    assert any(fnmatch.fnmatch("digits.npz", p) for p in patterns)
    assert (ROOT / "pyro_wakesleep" / "data" / "__init__.py").exists()


def test_shipped_digits_is_a_plain_npz():
    data = resources.files("pyro_wakesleep.data").joinpath("digits.npz").read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}


# ---------------------------------------------------------------------------- bars


def exact_bars_entropy(p_vertical=2 / 3, p_on=0.2, size=4):
    """Entropy in nats from the formula: patterns with 1..size-1 bars on occur in one
    orientation only; all-off and all-on occur in both, so their orientation terms add up."""
    h = 0.0
    for k in range(1, size):
        for p_o in (p_vertical, 1 - p_vertical):
            p = p_o * p_on**k * (1 - p_on) ** (size - k)
            h -= math.comb(size, k) * p * math.log(p)
    for p in ((1 - p_on) ** size, p_on**size):
        h -= p * math.log(p)
    return h


def image_codes(images):
    return (images.long() * (1 << torch.arange(images.shape[1]))).sum(1)


def test_bars_distribution_is_exact():
    images, probs = Bars().distribution()
    assert images.shape == (30, 16) and probs.shape == (30,) and probs.dtype == torch.float64
    assert abs(probs.sum().item() - 1) < 1e-12
    assert len(torch.unique(image_codes(images))) == 30  # all distinct
    grids = images.reshape(-1, 4, 4)
    vertical = (grids == grids[:, :1, :]).all(dim=(1, 2))
    horizontal = (grids == grids[:, :, :1]).all(dim=(1, 2))
    assert (vertical | horizontal).all()
    both = vertical & horizontal  # all off and all on
    assert sorted(probs[both].tolist()) == pytest.approx([0.2**4, 0.8**4], abs=1e-15)
    on = grids[:, 0, :].sum(1)  # bars on in a vertical image
    expected = 2 / 3 * 0.2 ** on.double() * 0.8 ** (4 - on.double())
    keep = vertical & ~both
    assert torch.allclose(probs[keep], expected[keep], rtol=1e-12, atol=0)


def test_bars_entropy():
    exact = exact_bars_entropy()
    assert Bars().entropy() == pytest.approx(exact, abs=1e-12)
    assert round(exact, 3) == 2.376
    assert Bars(p_on=0.0).entropy() == 0.0  # only the empty image
    # other sizes: 2 * 2**size - 2 distinct images
    images, probs = Bars(size=3, p_vertical=0.5, p_on=0.4).distribution()
    assert len(images) == 14 and abs(probs.sum().item() - 1) < 1e-12
    assert Bars(3, 0.5, 0.4).entropy() == pytest.approx(exact_bars_entropy(0.5, 0.4, 3), 1e-12)


def test_bars_samples_follow_the_distribution():
    bars = Bars()
    n = 200_000
    x = bars.sample(n, torch.Generator().manual_seed(0))
    assert x.shape == (n, 16) and x.dtype == torch.float32
    images, probs = bars.distribution()
    codes, counts = torch.unique(image_codes(x), return_counts=True)
    support = image_codes(images).tolist()
    assert set(codes.tolist()) <= set(support)
    freq = torch.zeros(len(support), dtype=torch.float64)
    for code, count in zip(codes.tolist(), counts.tolist()):
        freq[support.index(code)] = count / n
    # Each frequency is a binomial proportion with standard error sqrt(p(1 - p) / n); 5 SE
    # over 30 images fails a correct sampler with probability about 2e-5.
    assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt()).all()
    same = bars.sample(100, torch.Generator().manual_seed(1))
    assert torch.equal(same, bars.sample(100, torch.Generator().manual_seed(1)))


def test_bars_kl_bits():
    bars = Bars()
    images, probs = bars.distribution()
    assert bars.kl_bits(probs.log()) == pytest.approx(0.0, abs=1e-12)
    assert bars.kl_bits(lambda imgs: probs.log()) == pytest.approx(0.0, abs=1e-12)
    # uniform over the 30 images: KL = log2(30) - H / ln 2
    uniform = torch.full((30,), -math.log(30), dtype=torch.float64)
    assert bars.kl_bits(uniform) == pytest.approx(
        math.log2(30) - exact_bars_entropy() / math.log(2), abs=1e-12
    )
    # a model that leaks 1% of its mass outside the data images: KL = -log2(0.99) > 0
    assert bars.kl_bits(probs.log() + math.log(0.99)) == pytest.approx(-math.log2(0.99))
    # any other normalized distribution gives KL > 0
    other = torch.softmax(probs.log() + 0.3 * torch.randn(30, dtype=torch.float64), 0)
    assert bars.kl_bits(other.log()) > 0
    assert bars.kl_bits(torch.where(torch.arange(30) == 0, -math.inf, 0.0)) == math.inf
    with pytest.raises(ValueError, match="expected 30"):
        bars.kl_bits(torch.zeros(29))


def test_bars_arguments():
    with pytest.raises(ValueError):
        Bars(size=0)
    with pytest.raises(ValueError):
        Bars(p_on=1.5)


# ---------------------------------------------------------------------------- load_dataset


def test_load_dataset_digits_and_bars():
    digits = load_dataset("digits")
    assert digits["train"].shape == (3000, 784) and "test_labels" in digits
    bars = load_dataset("bars", generator=torch.Generator().manual_seed(0), num_train=50)
    assert bars["train"].shape == (50, 16) and bars["test"].shape == (1000, 16)
    again = load_dataset("bars", generator=torch.Generator().manual_seed(0), num_train=50)
    assert torch.equal(bars["train"], again["train"])


@needs_mnist
@needs_binarized
def test_load_dataset_binarized_mnist(shared_rows):
    data = load_dataset("binarized-mnist", BINARIZED, labels_path=MNIST)  # path positional
    assert data["train"].shape == (50000, 784) and data["valid"].shape == (10000, 784)
    assert np.array_equal(data["test"].numpy(), shared_rows["test"])
    assert torch.equal(data["test_labels"], binarized_mnist_test_labels(MNIST))
    assert load_dataset(BINARIZED)["test"].shape == (10000, 784)  # a bare path


@needs_mnist
def test_load_dataset_mnist_dynamic():
    g = torch.Generator().manual_seed(0)
    data = load_dataset("mnist-dynamic", path=MNIST, generator=g)
    assert data["train"].shape == (50000, 784) and data["valid"].shape == (10000, 784)
    assert data["test"].shape == (10000, 784) and data["test_labels"].shape == (10000,)
    assert data["train_labels"].shape == (50000,) and data["train_probs"].max() <= 1
    fresh = data["dynamic"](g)
    assert fresh.shape == (50000, 784) and not torch.equal(fresh, data["train"])
    assert ((fresh == 0) | (fresh == 1)).all()


def test_load_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="neither a dataset name"):
        load_dataset("no-such-dataset")
    with pytest.raises(ValueError, match="needs path"):
        load_dataset("mnist-dynamic")
    with pytest.raises(DatasetError, match="file not found"):
        load_dataset("binarized-mnist", tmp_path / "absent.npz")


def test_module_constants():
    assert BINARIZED_MNIST_URL.startswith("http://www.cs.toronto.edu/~larocheh/")
    assert set(BINARIZED_MNIST_SHA256) == set(SPLITS) == set(datasets.BINARIZED_MNIST_SIZES)
