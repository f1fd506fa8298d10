"""Fetching public data files with a checksum: the shared part of ``python -m datamodules.<dataset> download``.

:func:`fetch` reads a URL (``https://``, ``http://`` or ``file://``) into a
file, checking its SHA-256: of the bytes as downloaded, or -- for a gzip file
with ``gunzipped=True`` -- of its decompressed content, which does not depend on
how (or when) the file was compressed. A file already in place with the right
checksum is not fetched again; a wrong checksum removes the download and raises
a ``ValueError`` naming the URL, both checksums and what to do.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import urllib.request
from pathlib import Path

CHUNK = 1 << 20


def sha256_of(path: str | Path, gunzipped: bool = False) -> str:
    """SHA-256 (hex) of a file's bytes, or of its decompressed content with ``gunzipped=True``."""
    digest = hashlib.sha256()
    opener = gzip.open if gunzipped else open
    try:
        with opener(path, "rb") as stream:
            for block in iter(lambda: stream.read(CHUNK), b""):
                digest.update(block)
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read it{' as gzip' if gunzipped else ''} ({error})") from None
    return digest.hexdigest()


def fetch(url: str, destination: str | Path, sha256: str | None, gunzipped: bool = False, timeout: float = 60) -> Path:
    """Download ``url`` to ``destination`` and check its SHA-256 (``None``: no check, for a URL given by the user).

    Returns ``destination``. Raises ``ValueError`` when the download fails or its checksum differs.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if sha256 is not None and destination.exists():
        try:
            if sha256_of(destination, gunzipped) == sha256.lower():
                return destination
        except ValueError:
            pass  # a damaged earlier download: fetch it again
    partial = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, CHUNK)
    except (OSError, ValueError) as error:  # URLError is an OSError
        partial.unlink(missing_ok=True)
        raise ValueError(f"cannot download {url}: {error}. Check the network (or a proxy), or download the file "
                         f"yourself and pass --url file:///path/to/{destination.name}") from None
    if sha256 is not None:
        try:
            got = sha256_of(partial, gunzipped)
        except ValueError:
            partial.unlink(missing_ok=True)
            raise
        if got != sha256.lower():
            partial.unlink(missing_ok=True)
            what = "decompressed content" if gunzipped else "file"
            raise ValueError(
                f"{url}: the SHA-256 of the {what} is {got}, expected {sha256.lower()}; the download is corrupt or "
                f"the published file changed. Retry; to accept this version on purpose pass --sha256 {got}"
            )
    partial.replace(destination)
    return destination
