"""The search's storage: a local directory or any URI Ray Tune's ``storage_path`` takes.

Ray Tune opens its ``storage_path`` with ``pyarrow.fs.FileSystem.from_uri`` (``s3://``,
``gs://``, ``file://``, ``hdfs://``, ...). The search's own files (``config.yaml``, the
MLflow run map, ``summary.json``, the report, searcher artifacts, the reference cache)
go through the same pyarrow filesystem here, so a search directory is one place that
``haqtune resume <location>`` finds from any machine that can reach it. Nothing else in
haqtune builds a ``Path`` from a storage location: ``Path("s3://b/x")`` is ``s3:/b/x``.

``Storage`` is one location in that storage (a file or a directory) with the small part
of ``pathlib.Path``'s interface the search needs (``/``, ``name``, ``parent``,
``exists``, ``read_text``, ``write_text``, ``iterdir`` ...), so a local search reads
exactly as before. Writes are atomic: on a local disk a temp file + ``os.replace``;
on an object store one PUT (an object appears whole or not at all).

S3 endpoints and credentials come from the usual AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for an S3-compatible server) or from the
URI's query (``s3://bucket/runs?endpoint_override=host:9000&scheme=http``), exactly as
for Ray Tune, which receives the same URI.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from .errors import HaqtuneError

URI_EXAMPLES = "s3://bucket/path, gs://bucket/path, file:///path"
# pyarrow filesystems whose first path component is a bucket, which haqtune never creates.
_BUCKET_FILESYSTEMS = ("s3", "gcs")
_COPY_CHUNK_BYTES = 1 << 20


def is_uri(location: str | os.PathLike) -> bool:
    """A storage URI (``scheme://...``) rather than a local path; the same test as
    ``SearchConfig.resolved`` uses to keep a location as it is."""
    return "://" in str(location)


def join(location: str, *parts: str) -> str:
    """``location/part/...``; a URI keeps its query (``s3://b/x?endpoint_override=h`` +
    ``id`` -> ``s3://b/x/id?endpoint_override=h``)."""
    if not is_uri(location):
        return os.path.join(location, *parts)
    split = urllib.parse.urlsplit(location)
    return urllib.parse.urlunsplit(split._replace(path=posixpath.join(split.path or "/", *parts)))


def _split_last(location: str) -> tuple[str, str]:
    """(parent location, last component)."""
    if not is_uri(location):
        path = os.path.normpath(location)
        return os.path.dirname(path), os.path.basename(path)
    split = urllib.parse.urlsplit(location)
    path = split.path.rstrip("/")
    head, name = posixpath.split(path)
    return urllib.parse.urlunsplit(split._replace(path=head if head != "/" else "")), name


def open_storage(location: str | os.PathLike | Storage, *, what: str = "storage_dir") -> Storage:
    """The ``Storage`` at ``location`` (a local path, made absolute, or a URI).

    Opens the filesystem the way Ray Tune does and writes nothing. An unknown or
    unsupported scheme (``foo://``, ``s3://`` on a pyarrow built without S3) is a
    HaqtuneError, starting with ``what`` (the setting or argument), that says which
    locations work.
    """
    if isinstance(location, Storage):
        return location
    import pyarrow.fs

    text = str(location)
    if not is_uri(text):
        path = os.path.abspath(text)
        return Storage(path, pyarrow.fs.LocalFileSystem(), path)
    if urllib.parse.urlsplit(text).password is not None:
        # pyarrow takes s3://KEY:SECRET@bucket/..., but the location is printed, kept in
        # config.yaml and logged to MLflow.
        raise HaqtuneError(
            f"{what}: the URI holds credentials (user:secret@), which would be written to "
            "config.yaml, MLflow and the terminal: expected them in the environment (AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY for S3, GOOGLE_APPLICATION_CREDENTIALS for GCS)"
        )
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(text)
    except (ValueError, NotImplementedError, OSError) as exc:  # ArrowInvalid, ArrowNotImplementedError
        reason = " ".join(str(exc).split())
        raise HaqtuneError(
            f"{what}: cannot use {text!r} ({reason}): expected a local path or a URI Ray Tune's "
            f"storage_path takes, such as {URI_EXAMPLES}"
        ) from None
    return Storage(text, fs, path)


def check_storage(location: str | os.PathLike, *, what: str = "storage_dir") -> Storage:
    """Validate a search's storage before anything runs: the scheme is supported and
    the storage answers (credentials, endpoint, bucket). Reads only: creates no bucket,
    writes nothing. Returns its ``Storage``."""
    storage = open_storage(location, what=what)
    if storage.is_local:
        return storage
    try:
        if storage.fs.type_name in _BUCKET_FILESYSTEMS:
            bucket = storage.path.split("/", 1)[0]
            if storage.fs.get_file_info(bucket).type.name == "NotFound":
                raise HaqtuneError(f"{what}: bucket {bucket!r} of {storage.location!r} does not exist: "
                                   "expected an existing bucket (haqtune creates none)")
        storage.fs.get_file_info(storage.path)
    except OSError as exc:
        reason = " ".join(str(exc).split())
        raise HaqtuneError(f"{what}: cannot reach {storage.location!r} ({reason}): expected a "
                           "storage this machine can read (check its credentials and endpoint)") from None
    return storage


class Storage:
    """One file or directory in a search's storage (see the module docstring).

    ``location`` is what users see and pass on (an absolute local path or the URI,
    query included); ``fs`` and ``path`` address it on its pyarrow filesystem.
    Pickles as its location (the filesystem is opened again where it is unpickled).
    """

    __slots__ = ("location", "fs", "path")

    def __init__(self, location: str, fs, path: str) -> None:
        self.location, self.fs, self.path = location, fs, path

    def __reduce__(self):
        return (open_storage, (self.location,))

    def __str__(self) -> str:
        return self.location

    def __repr__(self) -> str:
        return f"Storage({self.location!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Storage) and other.location == self.location

    def __hash__(self) -> int:
        return hash(self.location)

    def __truediv__(self, part: str) -> Storage:
        return Storage(join(self.location, part), self.fs, posixpath.join(self.path, part))

    @property
    def name(self) -> str:
        return _split_last(self.location)[1]

    @property
    def parent(self) -> Storage:
        return Storage(_split_last(self.location)[0], self.fs, posixpath.dirname(self.path.rstrip("/")))

    @property
    def is_local(self) -> bool:
        """On this machine's file system (a plain path or a ``file://`` URI)."""
        import pyarrow.fs

        return isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    # ---- reading ----------------------------------------------------------------------

    def _type(self) -> str:
        return self.fs.get_file_info(self.path).type.name  # NotFound | File | Directory

    def exists(self) -> bool:
        return self._type() != "NotFound"

    def is_file(self) -> bool:
        return self._type() == "File"

    def is_dir(self) -> bool:
        return self._type() == "Directory"

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def _entries(self) -> list:
        import pyarrow.fs

        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.path, allow_not_found=True))
        return sorted(infos, key=lambda info: info.path)

    def iterdir(self) -> Iterator[Storage]:
        """The entries directly inside this directory, sorted by name (none if it is missing)."""
        for info in self._entries():
            yield self / posixpath.basename(info.path.rstrip("/"))

    def file_sizes(self) -> dict[str, int]:
        """Name -> size in bytes of the files directly inside this directory (one listing)."""
        return {posixpath.basename(info.path): info.size for info in self._entries()
                if info.type.name == "File"}

    # ---- writing (atomic) -------------------------------------------------------------

    def mkdir(self, *, exist_ok: bool = True) -> None:
        """Create this directory (and its parents); FileExistsError if it exists and not ``exist_ok``."""
        if self.is_local:
            Path(self.path).mkdir(parents=True, exist_ok=exist_ok)
            return
        if not exist_ok and self.exists():
            raise FileExistsError(f"{self.location} exists")
        self.fs.create_dir(self.path, recursive=True)

    def write_bytes(self, data: bytes) -> None:
        if self.is_local:
            with self._local_temp() as tmp:
                tmp.write_bytes(data)
            return
        self._make_parent()
        with self.fs.open_output_stream(self.path) as stream:  # one PUT: atomic
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def upload(self, local: str | os.PathLike) -> None:
        """Copy the local file ``local`` to this location (atomically, streamed)."""
        with open(local, "rb") as src:
            if self.is_local:
                with self._local_temp() as tmp, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, _COPY_CHUNK_BYTES)
                return
            self._make_parent()
            with self.fs.open_output_stream(self.path) as dst:
                shutil.copyfileobj(src, dst, _COPY_CHUNK_BYTES)

    def download(self, local: str | os.PathLike) -> Path:
        """Copy this file to the local path ``local`` (temp file + rename); returns it."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as dst, self.fs.open_input_stream(self.path) as src:
                shutil.copyfileobj(src, dst, _COPY_CHUNK_BYTES)
            os.replace(tmp, local)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return local

    def _make_parent(self) -> None:
        # Object stores have no directories (a key is written whole, its "parents" are
        # only prefixes); hierarchical remote filesystems (HDFS, ...) need them.
        if self.fs.type_name not in _BUCKET_FILESYSTEMS:
            self.fs.create_dir(posixpath.dirname(self.path), recursive=True)

    @contextlib.contextmanager
    def _local_temp(self) -> Iterator[Path]:
        """A temp file beside this (local) file, moved into place when the block succeeds."""
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            yield Path(tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def local_directory(directory: Storage) -> Iterator[Path]:
    """A local directory with ``directory``'s files, for code that only takes local paths
    (the reference-model cache, ``torch.save``/``torch.load``).

    A local ``directory`` is yielded as it is. A remote one is copied into a temp
    directory; files added or changed there (by name and size) are uploaded when the
    block ends without an exception, then the temp directory is removed.
    """
    if directory.is_local:
        Path(directory.path).mkdir(parents=True, exist_ok=True)
        yield Path(directory.path)
        return
    with tempfile.TemporaryDirectory(prefix="haqtune-storage-") as tmp:
        local = Path(tmp)
        fetched = directory.file_sizes()
        for name in fetched:
            (directory / name).download(local / name)
        yield local
        for file in sorted(local.iterdir()):
            if file.is_file() and fetched.get(file.name) != file.stat().st_size:
                (directory / file.name).upload(file)
