"""Where data files live: local paths, or URIs of an object store or HDFS, with bounded retries naming the file.

The lowest layer of the reader (this module <- ``paths`` <- ``files``). A path
spec that is a URI -- ``s3://bucket/logs/day=2026-11-*/``, ``gs://...``,
``hdfs://namenode:8020/...``, ``abfs://container@account.dfs.core.windows.net/...``
-- is read through the ecosystem's filesystems; this module holds no client code:

* **fsspec** (the default, as in pandas, Dask and Lightning's own checkpoint
  I/O): the URI's filesystem is ``fsspec.core.url_to_fs(uri, **storage_options)``,
  so ``storage_options`` are the keyword arguments of that fsspec
  implementation (s3fs: ``key``, ``secret``, ``endpoint_url``,
  ``client_kwargs``...; gcsfs: ``token``, ``project``; adlfs: ``account_name``,
  ``account_key``...). The implementation must be installed (``pip install
  s3fs`` / ``gcsfs`` / ``adlfs``); ``hdfs://`` uses fsspec's wrapper of
  pyarrow's own ``HadoopFileSystem``, which is then used directly.
* **pyarrow** (``filesystem=``): a ``pyarrow.fs.FileSystem`` such as
  ``pyarrow.fs.S3FileSystem(endpoint_override=..., access_key=...)`` (C++
  clients, no fsspec package needed), or an fsspec filesystem object, serves
  every URI of the split; ``storage_options`` must then be empty.

Every call that touches a remote file (a listing, opening a footer, reading a
row group or a batch, creating a file) goes through ``Storage.call``: an error
that may be transient -- an ``OSError`` such as a reset connection, a timeout,
a throttling or 5xx answer, and a refused or unreachable endpoint, which
botocore reports outside ``OSError`` (``EndpointConnectionError``) -- is
retried after a delay that doubles from ``RetryPolicy.initial_delay`` up to
``max_delay`` (times a random factor in [0.5, 1], so that workers do not retry
in step), at most ``RetryPolicy.attempts`` tries in all; then a
:class:`StorageError` (a ``ValueError``) names the URI, what was being done
(listing, reading, opening, writing), the number of tries, the last error and
what to check. An error no retry can fix -- refused credentials
(``PermissionError``, or pyarrow's ``ACCESS_DENIED`` / ``INVALID_ACCESS_KEY_ID``),
a missing bucket or file -- is raised at once as a ``StorageError`` naming the
URI and the action, saying what to check: the credentials, the endpoint, the
bucket. ``Storage.open_output`` checks that the bucket exists before anything is
written, and its stream reports a failed upload (on ``close``, where an object
store receives the file) the same way. Local files are read as before, without
retries (their errors are not transient).

A ``Storage`` is plain, picklable data (the protocol, the options, the user's
filesystem object): each process -- a DataLoader worker, a DDP rank -- makes
its own client on first use (fsspec's clients are not fork-safe).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar
from urllib.parse import urlsplit

import pyarrow.fs as pafs

URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# errors that no retry can fix: the path is wrong or the credentials do not allow it
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_NETLOC_PATHS = ("hdfs", "viewfs", "webhdfs")  # the URI's netloc is a host, not part of the filesystem path

T = TypeVar("T")


def uri_scheme(spec: Any) -> str | None:
    """The scheme of a remote URI (``"s3"``), or ``None`` for a local path (``file://`` URIs are local)."""
    if not isinstance(spec, str):
        return None
    match = URI.match(spec)
    if match is None or match.group(1).lower() == "file":
        return None
    return match.group(1).lower()


def local_path(spec: str) -> str:
    """A ``file://`` URI as a plain path (other specs unchanged)."""
    return spec[len("file://"):] if spec.lower().startswith("file://") else spec


@dataclass(frozen=True)
class RetryPolicy:
    """How remote reads are retried: at most ``attempts`` tries, delays doubling from ``initial_delay`` to ``max_delay`` s."""

    attempts: int = 4
    initial_delay: float = 0.5
    max_delay: float = 8.0

    def __post_init__(self) -> None:
        if int(self.attempts) < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.initial_delay < 0 or self.max_delay < self.initial_delay:
            raise ValueError(f"RetryPolicy delays must satisfy 0 <= initial_delay <= max_delay, got "
                             f"{self.initial_delay} and {self.max_delay}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed try."""
        return min(self.max_delay, self.initial_delay * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)


# connection failures that client libraries raise outside OSError (botocore: EndpointConnectionError for a refused or
# unreachable endpoint, ConnectTimeoutError, ...; urllib3: NewConnectionError, ...), matched by class name and module
# so that no client library is imported here
_CONNECTION_ERRORS = {
    "botocore": {"EndpointConnectionError", "ConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                 "ConnectionClosedError", "ProxyConnectionError", "HTTPClientError", "ResponseStreamingError"},
    "urllib3": {"NewConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ProtocolError", "MaxRetryError"},
}
# pyarrow's native S3 client reports a refused permission as a plain OSError carrying the AWS error code
_DENIED = re.compile(r"AWS Error (ACCESS_DENIED|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|UNRECOGNIZED_CLIENT"
                     r"|MISSING_AUTHENTICATION_TOKEN|INVALID_CLIENT_TOKEN_ID|EXPIRED_TOKEN)|AccessDenied|Forbidden")
_NO_BUCKET = re.compile(r"NO_SUCH_BUCKET|NoSuchBucket|specified bucket does not exist", re.IGNORECASE)


def connection_error(err: BaseException) -> bool:
    """Whether ``err`` says the store could not be reached (refused, unreachable, timed out, cut off)."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    for cls in type(err).__mro__:
        names = _CONNECTION_ERRORS.get(cls.__module__.split(".")[0])
        if names is not None and cls.__name__ in names:
            return True
    return isinstance(err, OSError) and "NETWORK_CONNECTION" in str(err)  # pyarrow's native clients


def permission_error(err: BaseException) -> bool:
    """Whether ``err`` is the store refusing the credentials or the permission."""
    return isinstance(err, PermissionError) or (isinstance(err, OSError) and bool(_DENIED.search(str(err))))


def transient(err: BaseException) -> bool:
    """Whether a failed remote call may succeed when tried again.

    An ``OSError`` other than a missing file or a refused permission, or a connection error of a client library.
    """
    if connection_error(err):
        return True
    return isinstance(err, OSError) and not isinstance(err, PERMANENT_ERRORS) and not permission_error(err) \
        and not _NO_BUCKET.search(str(err))


def describe(err: BaseException) -> str:
    """``"<error class>: <message>"``, for the messages that name a failed call."""
    return f"{type(err).__name__}: {str(err).strip() or repr(err)}"


class StorageError(ValueError):
    """A remote call that failed for good: the message names the URI, the action, the error and what to check.

    ``uri``, ``action`` and ``cause`` (the last error of the client library) are kept as attributes.
    """

    def __init__(self, message: str, uri: str, action: str, cause: BaseException) -> None:
        super().__init__(message)
        self.uri, self.action, self.cause = uri, action, cause


def what_to_check(err: BaseException, uri: str) -> str:
    """The hint of a failed call's message: the credentials, the endpoint, the bucket, the path."""
    bucket = _bucket(uri)
    if permission_error(err):
        return ("the store refused the credentials or the permission: check the key and secret (storage_options, "
                "or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and ~/.aws for s3://), that they belong to this "
                f"endpoint, and that they may access {f'the bucket {bucket!r}' if bucket else 'this path'}")
    if _NO_BUCKET.search(str(err)):
        return (f"the bucket {bucket!r} does not exist at this endpoint: check the bucket name, the endpoint "
                "(storage_options endpoint_url / AWS_ENDPOINT_URL), or create the bucket")
    if isinstance(err, (FileNotFoundError, NotADirectoryError)):
        return (f"no such file or folder: check the path and the bucket {bucket!r}" if bucket else
                "no such file or folder: check the path")
    if isinstance(err, IsADirectoryError):
        return "the URI names a folder where a file is expected: check the path"
    if connection_error(err):
        return ("the store cannot be reached: check the endpoint (storage_options endpoint_url, or "
                "AWS_ENDPOINT_URL for s3://), the network and that the service is up")
    return "the store keeps failing on this file: check the endpoint and the credentials"


def _bucket(uri: str) -> str:
    """The bucket (container) of an object-store URI, ``""`` for HDFS-like URIs and local paths."""
    scheme = uri_scheme(uri)
    if scheme is None or scheme in _NETLOC_PATHS:
        return ""
    return urlsplit(uri).netloc.split("@")[0]


# this process's filesystem clients by ``Storage.key``, and the process they belong to (a forked worker starts over)
_CLIENTS: dict[str, tuple[pafs.FileSystem, Any]] = {}
_CLIENTS_PID = os.getpid()
_CLIENTS_LOCK = threading.Lock()


class Storage:
    """One remote filesystem of a split (one scheme, and host for HDFS), as picklable data; see the module docstring.

    ``uri(path)`` and ``path(uri)`` translate between the URIs that name files
    in messages and ``DataFile``s and the paths the filesystem takes.
    """

    def __init__(
        self,
        uri: str,
        storage_options: Mapping[str, Any] | None = None,
        filesystem: Any = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        scheme = uri_scheme(uri)
        if scheme is None:
            raise ValueError(f"{uri}: not a remote URI (scheme://...)")
        if filesystem is not None and storage_options:
            raise ValueError("give either filesystem= (a ready filesystem object) or storage_options= (options for "
                             "fsspec to make one), not both")
        if filesystem is not None and not _is_filesystem(filesystem):
            raise TypeError(f"filesystem must be a pyarrow.fs.FileSystem or an fsspec filesystem, got "
                            f"{type(filesystem).__name__}")
        self.scheme = scheme
        parts = urlsplit(uri)
        self.netloc = parts.netloc if scheme in _NETLOC_PATHS else ""
        self.storage_options = dict(storage_options or {})
        self.user_filesystem = filesystem
        self.retry = retry or RetryPolicy()
        try:
            options = json.dumps(self.storage_options, sort_keys=True, default=repr)
        except (TypeError, ValueError):
            options = repr(sorted(self.storage_options.items()))
        user = f"{type(filesystem).__module__}.{type(filesystem).__qualname__}@{id(filesystem)}" if filesystem else ""
        self.key = f"{scheme}://{self.netloc}|{options}|{user}"
        self._pid = os.getpid()  # the process whose objects ``user_filesystem`` is

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Storage) and other.key == self.key and other.retry == self.retry

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"Storage({self.scheme}://{self.netloc})"

    # ------------------------------------------------------------ clients
    def _clients(self) -> tuple[pafs.FileSystem, Any]:
        """``(pyarrow filesystem, fsspec filesystem or None)`` of this process.

        Made on first use in each process: a client inherited through ``fork``
        (a DataLoader worker) is not used; a user's filesystem object is copied
        through pickle there, which makes a new client from its options.
        """
        global _CLIENTS_PID
        with _CLIENTS_LOCK:
            if _CLIENTS_PID != os.getpid():
                _CLIENTS.clear()
                _CLIENTS_PID = os.getpid()
            found = _CLIENTS.get(self.key)
            if found is None:
                found = _CLIENTS[self.key] = self._connect()
            return found

    def _connect(self) -> tuple[pafs.FileSystem, Any]:
        given = self.user_filesystem
        if given is not None:
            if self._pid != os.getpid():  # inherited through fork, or unpickled: a client of this process
                given = pickle.loads(pickle.dumps(given))
            return _as_pyarrow(given)
        import fsspec

        root = f"{self.scheme}://{self.netloc}/" if self.netloc else f"{self.scheme}://"
        try:
            fsspec.get_filesystem_class(self.scheme)
        except ImportError as err:
            raise ValueError(
                f"{root}: fsspec cannot open {self.scheme}:// URIs here ({describe(err)}); install the package it "
                f"names (s3fs for s3://, gcsfs for gs://, adlfs for abfs://), or pass filesystem= a "
                f"pyarrow.fs.FileSystem (e.g. pyarrow.fs.S3FileSystem(...))"
            ) from err
        except ValueError as err:
            raise ValueError(f"{root}: no filesystem for the scheme {self.scheme!r} ({err}); give a path, or a URI "
                             "of a scheme fsspec knows (s3://, gs://, hdfs://, abfs://...)") from err
        try:
            fs, _ = fsspec.core.url_to_fs(root, **self.storage_options)
        except TypeError as err:
            raise ValueError(f"{root}: storage_options {sorted(self.storage_options)} were refused by the "
                             f"{self.scheme}:// filesystem ({err})") from err
        return _as_pyarrow(fs)

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The ``pyarrow.fs.FileSystem`` of this storage in this process (an fsspec one wrapped by ``PyFileSystem``)."""
        return self._clients()[0]

    # -------------------------------------------------------------- names
    def path(self, uri: str) -> str:
        """The filesystem path of ``uri``: ``bucket/key`` (object stores), ``/path`` (HDFS)."""
        fs, fsspec_fs = self._clients()
        if fsspec_fs is not None:
            path = fsspec_fs._strip_protocol(uri)
        elif self.scheme in _NETLOC_PATHS:
            path = urlsplit(uri).path
        else:
            path = uri[len(self.scheme) + 3:]
        return path.rstrip("/") or path

    def uri(self, path: str) -> str:
        """The URI naming filesystem path ``path``."""
        if self.scheme in _NETLOC_PATHS:
            return f"{self.scheme}://{self.netloc}/{path.lstrip('/')}"
        return f"{self.scheme}://{path.lstrip('/')}"

    # ------------------------------------------------------------- retries
    def call(self, uri: str, action: str, fn: Callable[[], T]) -> T:
        """``fn()``, tried again after a transient error (see the module docstring); ``action`` is what it does, for the message.

        Raises :class:`StorageError` (a ``ValueError`` naming ``uri`` and
        ``action``) when the retries are spent, or at once for a refused
        permission or a missing bucket or file; any other error (a corrupt
        file, a bug) propagates unchanged.
        """
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fn()
            except StorageError:
                raise  # a nested call's: it names the URI already
            except Exception as err:
                if not transient(err):
                    if permission_error(err) or isinstance(err, PERMANENT_ERRORS) or _NO_BUCKET.search(str(err)):
                        raise StorageError(f"{uri}: {action} failed with {describe(err)}; "
                                           f"{what_to_check(err, uri)}", uri, action, err) from err
                    raise
                if attempt == self.retry.attempts:
                    raise StorageError(
                        f"{uri}: {action} failed {attempt} time(s), the last with {describe(err)}; "
                        f"{what_to_check(err, uri)} (or raise ParquetDataModule(retries=...))", uri, action, err
                    ) from err
                time.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    # ---------------------------------------------------------- operations
    def info(self, uri: str) -> pafs.FileInfo:
        path = self.path(uri)
        return self.call(uri, "reading its file information", lambda: self.filesystem.get_file_info(path))

    def list(self, uri: str, recursive: bool) -> list[pafs.FileInfo]:
        """The entries below folder ``uri`` (``[]`` when there is none), with filesystem paths."""
        selector = pafs.FileSelector(self.path(uri), allow_not_found=True, recursive=recursive)
        return self.call(uri, "listing the folder", lambda: self.filesystem.get_file_info(selector))

    def open_input(self, uri: str) -> Any:
        """A random-access file of ``uri`` for ``pyarrow.parquet.ParquetFile`` (reads are ranged requests, not read-ahead)."""
        fs, fsspec_fs = self._clients()
        path = self.path(uri)
        if fsspec_fs is not None:
            # no read-ahead cache: pyarrow asks for exactly the byte ranges it needs (pre_buffer coalesces them)
            return self.call(uri, "opening the file", lambda: fsspec_fs.open(path, mode="rb", cache_type="none"))
        return self.call(uri, "opening the file", lambda: fs.open_input_file(path))

    def open_output(self, uri: str) -> "OutputStream":
        """A writable stream creating ``uri`` (an object store uploads it when the stream is closed).

        The bucket is checked first (``StorageError`` naming ``uri`` when it does
        not exist, before anything is computed to be written); the stream's
        ``write`` and ``close`` raise ``StorageError`` naming ``uri`` when the
        store refuses the upload.
        """
        path = self.path(uri)
        bucket = _bucket(uri)
        if bucket:
            try:
                info = self.call(uri, "checking the bucket before writing",
                                 lambda: self.filesystem.get_file_info(bucket))
            except StorageError as err:
                if not permission_error(err.cause):
                    raise
                info = None  # credentials that may write but not look at the bucket: the upload will tell
            if info is not None and info.type == pafs.FileType.NotFound:
                missing = FileNotFoundError(f"bucket {bucket!r} not found")
                raise StorageError(f"{uri}: writing the file: the bucket {bucket!r} does not exist; check the bucket "
                                   "name and the endpoint (storage_options endpoint_url / AWS_ENDPOINT_URL), or "
                                   "create the bucket", uri, "writing the file", missing)
        stream = self.call(uri, "creating the file", lambda: self.filesystem.open_output_stream(path))
        return OutputStream(stream, uri)


class OutputStream:
    """A writable stream of ``Storage.open_output`` whose failures name the URI (see ``Storage.open_output``).

    ``pyarrow.parquet.ParquetWriter`` and ``write``/``flush``/``close`` use it as a file; an error of the store is
    raised as :class:`StorageError`. Writes are not retried: a stream cannot be rewound.
    """

    def __init__(self, stream: Any, uri: str) -> None:
        self._stream = stream
        self.uri = uri

    def _checked(self, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as err:
            if isinstance(err, OSError) or connection_error(err):
                raise StorageError(f"{self.uri}: {action} failed with {describe(err)}; {what_to_check(err, self.uri)}",
                                   self.uri, action, err) from err
            raise

    def write(self, data: Any) -> int:
        return self._checked("writing the file", lambda: self._stream.write(data))

    def flush(self) -> None:
        self._checked("writing the file", self._stream.flush)

    def close(self) -> None:
        if not self._stream.closed:
            self._checked("uploading the file (on close)", self._stream.close)

    def tell(self) -> int:
        return self._stream.tell()

    @property
    def closed(self) -> bool:
        return bool(self._stream.closed)

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def __enter__(self) -> "OutputStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_filesystem(obj: Any) -> bool:
    if isinstance(obj, pafs.FileSystem):
        return True
    try:
        from fsspec import AbstractFileSystem
    except ImportError:
        return False
    return isinstance(obj, AbstractFileSystem)


def _as_pyarrow(fs: Any) -> tuple[pafs.FileSystem, Any]:
    """``(pyarrow filesystem, fsspec filesystem or None)``: fsspec's wrappers of pyarrow filesystems are unwrapped."""
    if isinstance(fs, pafs.FileSystem):
        return fs, None
    from fsspec.implementations.arrow import ArrowFSWrapper

    if isinstance(fs, ArrowFSWrapper):
        return fs.fs, None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs
