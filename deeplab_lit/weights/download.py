"""Download weights once into torch's cache: keyed by the whole URL, checksummed, written atomically.

The cached name is the URL's file name with a short hash of the whole URL before its suffix
(``deeplabv3_resnet50_coco-cd0a2569.<12 hex>.pth``), so two URLs that end in the same file name
(``.../a/model.pth``, ``.../b/model.pth``) never share a cached file. The file is written under a
temporary name and renamed when complete, so an interrupted download never looks like a cached one.

The SHA-256 is checked where one is known: an explicit ``sha256`` (a whole digest or a prefix), else
torch hub's convention of a ``-<hex>.`` digest prefix in the URL's file name (torchvision's URLs:
``resnet50-0676ba61.pth``). Only 8 to 64 hex digits holding at least one letter count as a prefix, so
that numbers in names (kazuto1011's ``...-vocaug-20000.pth``, a date ``-20240101.``) are not mistaken
for one. A cached file that fails its checksum, or that cannot be read (see ``refresh``), is fetched
again once; if that fails, the error says the cached copy is damaged and why, and why the download failed.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.parse
import uuid
import warnings
from pathlib import Path

import torch

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.")
_CHUNK = 1 << 20


def is_url(source: str) -> bool:
    """Whether ``source`` is a URL that :func:`download` fetches (http, https, file or ftp)."""
    return urllib.parse.urlparse(source).scheme in ("http", "https", "file", "ftp")


def cache_path(url: str) -> Path:
    """Return the file ``url`` is cached as: torch's checkpoint folder, the URL's file name and hash."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or "weights"
    stem, suffix = os.path.splitext(name)
    key = hashlib.sha256(url.encode()).hexdigest()[:12]
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{stem}.{key}{suffix}"


def expected_sha256(url: str, sha256: str | None = None) -> str | None:
    """Return the SHA-256 (or prefix) to check: ``sha256`` if given, else the one in the file name."""
    if sha256:
        if not re.fullmatch(r"[0-9a-fA-F]{1,64}", sha256):
            raise ValueError(f"sha256 must be a hex digest (or a prefix of one), got {sha256!r}")
        return sha256.lower()
    name = os.path.basename(urllib.parse.urlparse(url).path)
    found = _HASH_IN_NAME.search(name)
    if found is None or not re.search(r"[a-f]", found.group(1)):
        return None
    return found.group(1)


def checksum_problem(path: Path, expected: str | None) -> str | None:
    """Return why ``path`` fails the expected SHA-256 (prefix), or None if it passes or none is known."""
    if not expected:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    found = digest.hexdigest()
    if found.startswith(expected):
        return None
    return f"its SHA-256 is {found[: max(len(expected), 8)]}..., expected {expected}"


def download(url: str, *, sha256: str | None = None, refresh: bool = False, to: Path | None = None) -> Path:
    """Return the cached copy of ``url``, downloading it first if it is not cached or fails its checksum.

    Args:
        url: An ``http(s)://``, ``file://`` or ``ftp://`` URL.
        sha256: The file's SHA-256 (or a prefix); None to use the prefix in the file name, if any.
        refresh: Fetch it again even if cached (a cached copy that turned out unreadable).
        to: Where to keep it instead of :func:`cache_path` (named weights use their own file name, which
            the registry keeps unique, so that a copy put there by hand or by torchvision is found).

    Raises:
        RuntimeError: the download failed (offline and not cached); the message says where to put the file.
        ValueError: the downloaded file fails its checksum.
    """
    cached, expected = to or cache_path(url), expected_sha256(url, sha256)
    damage = None
    if cached.is_file():
        damage = "it could not be read" if refresh else checksum_problem(cached, expected)
        if damage is None:
            return cached
        if not refresh:  # the reader that found it unreadable has said so already
            warnings.warn(
                f"The cached copy {cached} of {url} is damaged ({damage}); downloading it again", stacklevel=2
            )
    return _fetch(url, cached, expected, damage)


def offline_message(
    what: str,
    err: BaseException,
    cache: str | os.PathLike[str],
    file_name: str,
    copy_to: str,
    instead: str,
    damage: str | None = None,
) -> str:
    """Say that a download failed, where torch's cache is, which file to put there, or what to pass instead.

    Args:
        what: What could not be downloaded (the URL, or the backbone and its weights name).
        err: The download error.
        cache: The folder the file is cached in (and any other cache worth naming).
        file_name: The file's name there.
        copy_to: Where to copy the file by hand.
        instead: How to pass a local file instead (the option and an example).
        damage: Why the copy already cached could not be used (a checksum mismatch, unreadable), if
            there is one: the download was to replace it.
    """
    cached, replace = f"{file_name} is not there", ""
    if damage is not None:
        cached = f"the copy of {file_name} there is damaged ({damage})"
        replace = ", replacing the damaged one"
    return (
        f"Could not download {what}: {err}. torch caches downloaded weights in {cache} and {cached}; this "
        "machine may be offline. Download the file on a machine with internet access and copy it to "
        f"{copy_to}{replace}, or {instead}."
    )


def _fetch(url: str, cached: Path, expected: str | None, damage: str | None = None) -> Path:
    """Download ``url`` to a temporary name beside ``cached``, check it, then rename it to ``cached``.

    ``damage`` says why the copy at ``cached`` (if any) could not be used; the error says it too.
    """
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f"{cached.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        torch.hub.download_url_to_file(url, str(partial), progress=True)
        problem = checksum_problem(partial, expected)
        if problem is not None:
            raise ValueError(
                f"The weights downloaded from {url} fail their checksum ({problem}): the download was "
                "corrupted, or the file at that address is not the one expected. Nothing was cached; try "
                "again, or check the address."
            )
        os.replace(partial, cached)
    except (OSError, http.client.HTTPException) as err:
        message = offline_message(
            f"the weights {url}",
            err,
            cached.parent,
            cached.name,
            str(cached),
            "pass its local path as weights",
            damage,
        )
        raise RuntimeError(message) from err
    finally:
        partial.unlink(missing_ok=True)
    return cached
