"""Where files go: the one module that knows what a path is.

A path is local (`runs/demo`, `/data/x`) or an object in a bucket: `gs://bucket/key` (gcsfs) or
`s3://bucket/key` (s3fs), both through fsspec, with `etils.epath` as the pathlib-like type, so `gs://`
strings stay intact (`pathlib.Path("gs://b/x")` would collapse `//`). `path(p)` gives a `pathlib.Path` for
a local path and an `epath.Path` for a bucket; both have `/`, `.name`, `.parent`, `.exists()`,
`.read_text()`, so callers use either the same way, and the functions below for what differs (atomic
writes, rename, glob, sizes, create-only writes).

Writers that must leave their destination whole or absent go through here: locally a file written beside
its target and replaced in one step, or a staging directory renamed into place; in a bucket a whole object
written in one request (readers see the old object or the new one), and a staging prefix copied into place.

Every failure of a bucket is a `StorageError`: one line naming the path (no such bucket, no credentials,
permission denied, nothing matches a glob, an unknown scheme, the cloud packages not installed).
"""
from __future__ import annotations

import builtins
import contextlib
import glob as globlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from jaxllm.storage.failures import describe, unreachable  # noqa: F401 - for callers

SCHEMES = {"gs": "gcsfs", "s3": "s3fs"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
INSTALL = "pip install 'jaxllm[cloud]'"


class StorageError(OSError):
    """A path cannot be used: the message is one line naming it."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingPath(StorageError, FileNotFoundError):
    """No object at a path in a bucket that exists."""


def scheme(p) -> str:
    """"gs", "s3", or "" for a local path; StorageError for any other scheme."""
    match = _SCHEME.match(os.fspath(p)) if isinstance(p, (str, os.PathLike)) else None
    if not match:
        return ""
    name = match.group(1).lower()
    if name == "file":
        return ""
    if name not in SCHEMES:
        raise StorageError(f"{os.fspath(p)}: unsupported storage scheme '{name}://' (jaxllm reads and writes local "
                           f"paths, gs:// and s3://)")
    if importlib.util.find_spec(SCHEMES[name]) is None:
        raise StorageError(f"{os.fspath(p)}: {name}:// needs the {SCHEMES[name]} package: {INSTALL}")
    return name


def is_remote(p) -> bool:
    """Whether `p` names an object in a bucket."""
    return bool(scheme(p))


def path(p):
    """`p` as a path object: `pathlib.Path` locally, `epath.Path` for gs:// and s3://."""
    if not is_remote(p):
        text = os.fspath(p)
        return Path(text[len("file://"):] if text.startswith("file://") else text)
    from etils import epath

    _quiet_clients()
    _require_credentials(p)
    return epath.Path(os.fspath(p))


def absolute(p):
    """`p` as an absolute path object (a bucket path is absolute already)."""
    return path(p) if is_remote(p) else Path(p).absolute()


def same(a, b) -> bool:
    """Whether `a` and `b` name the same file or directory."""
    if is_remote(a) or is_remote(b):
        return os.fspath(a).rstrip("/") == os.fspath(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def _quiet_clients() -> None:
    # gcsfs's "extended" file system asks a gRPC control API for every bucket's type (hierarchical
    # namespace), waiting up to a minute where that API is absent (emulators, some networks); jaxllm needs
    # none of it. Must be decided before gcsfs is first imported.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)  # its "out of retries" tracebacks: we report in one line
    # No cached listings: another host (or a lock's other holder) changes the bucket between our calls.
    from fsspec.config import conf

    for protocol in ("gs", "gcs", "s3", "s3a"):
        conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


def filesystem(p):
    """(fsspec filesystem, key without the scheme) of a bucket path."""
    import fsspec

    name = scheme(p)
    _quiet_clients()
    _require_credentials(p)
    return fsspec.filesystem(name), os.fspath(p)[len(name) + 3:].rstrip("/")


def _require_credentials(p) -> None:
    # before the client exists: gcsfs would fall back to anonymous requests (see storage/credentials.py)
    from jaxllm.storage.credentials import missing

    why = missing(scheme(p))
    if why is not None:
        raise StorageError(f"{os.fspath(p)}: {why}")


def supports_ocdbt(p) -> bool:
    """Whether orbax may keep arrays at `p` in an OCDBT database (its default). Local disks, GCS and S3 do;
    the GCS emulator (STORAGE_EMULATOR_HOST) does not answer the conditional manifest updates OCDBT makes
    once a database holds several arrays, so there each array is its own zarr store."""
    return not (scheme(p) == "gs" and os.environ.get("STORAGE_EMULATOR_HOST"))


def bucket(p) -> str:
    return os.fspath(p)[len(scheme(p)) + 3:].split("/", 1)[0]


# ----------------------------------------------------------------------------------------- errors

def _fail(p, err: BaseException) -> StorageError:
    if isinstance(err, StorageError):
        return err
    if is_remote(p) and isinstance(err, FileNotFoundError) and not _bucket_exists(p):
        return StorageError(f"{os.fspath(p)}: the bucket {scheme(p)}://{bucket(p)} does not exist")
    if isinstance(err, FileNotFoundError):
        return MissingPath(f"{os.fspath(p)}: no such file or directory")
    return StorageError(f"{os.fspath(p)}: {describe(err, scheme(p))}")


def _bucket_exists(p) -> bool:
    try:
        fs, _ = filesystem(p)
        return bool(fs.exists(bucket(p)))
    except Exception:  # noqa: BLE001 - cannot tell: report the original failure
        return True


@contextlib.contextmanager
def reporting(p):
    """Turn any failure of a bucket request inside the block into a one-line StorageError naming `p`
    (local paths raise what they raise)."""
    if not is_remote(p):
        yield
        return
    try:
        yield
    except StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - gcsfs, s3fs, botocore and google-auth raise many types
        raise _fail(p, err) from None


def check_bucket(p) -> None:
    """StorageError unless the bucket of a remote `p` exists and answers (local paths pass)."""
    if not is_remote(p):
        return
    with reporting(p):
        fs, _ = filesystem(p)
        fs.ls(bucket(p), detail=False)


# ----------------------------------------------------------------------------------------- reading

def exists(p) -> bool:
    with reporting(p):
        return path(p).exists()


def is_file(p) -> bool:
    with reporting(p):
        return path(p).is_file()


def is_dir(p) -> bool:
    with reporting(p):
        return path(p).is_dir()


def size(p) -> int:
    """Bytes in file `p`."""
    if not is_remote(p):
        return os.path.getsize(p)
    with reporting(p):
        fs, key = filesystem(p)
        return int(fs.size(key))


def open(p, mode: str = "rb", **kwargs):  # noqa: A001 - the module's own `open`, as fsspec's
    """A file object for `p` (text modes take `encoding`)."""
    if not is_remote(p):
        if "w" in mode or "a" in mode:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
        return _builtin_open(p, mode, **kwargs)
    with reporting(p):
        return path(p).open(mode, **kwargs)


_builtin_open = builtins.open


def read_bytes(p) -> bytes:
    with reporting(p):
        return path(p).read_bytes()


def read_text(p) -> str:
    with reporting(p):
        return path(p).read_text(encoding="utf-8") if not is_remote(p) else path(p).read_text()


def mtime(p) -> float:
    """When `p` was last written (seconds since the epoch); FileNotFoundError when it is absent."""
    if not is_remote(p):
        return os.stat(p).st_mtime
    with reporting(p):  # an absent object stays a FileNotFoundError (MissingPath)
        fs, key = filesystem(p)
        return fs.modified(key).timestamp()


def listdir(p) -> list[str]:
    """Names directly under directory `p`, sorted."""
    with reporting(p):
        return sorted(child.name for child in path(p).iterdir())


def glob(pattern, *, must_match: bool = True) -> list[str]:
    """Paths matching `pattern` (`*`, `**`, `?`, `[...]`), sorted, as strings (remote ones with their
    scheme). StorageError naming the pattern when nothing matches (unless `must_match=False`)."""
    text = os.fspath(pattern)
    if not is_remote(text):
        found = sorted(globlib.glob(text, recursive=True))
    else:
        with reporting(text):
            fs, key = filesystem(text)
            found = sorted(f"{scheme(text)}://{hit}" for hit in fs.glob(key))
    if not found and must_match:
        if is_remote(text) and not _bucket_exists(text):
            raise StorageError(f"{text}: the bucket {scheme(text)}://{bucket(text)} does not exist")
        raise StorageError(f"{text}: no files match")
    return found


# ----------------------------------------------------------------------------------------- writing

def makedirs(p) -> None:
    """Create directory `p` and its parents (in a bucket, directories are prefixes: nothing to create)."""
    if not is_remote(p):
        Path(p).mkdir(parents=True, exist_ok=True)


def write_atomic(p, data: str | bytes) -> None:
    """Write `data` to `p` so a reader sees the old file or the new one, never half: locally through a file
    beside it replaced in one step; in a bucket as one whole object."""
    if is_remote(p):
        with reporting(p):
            fs, key = filesystem(p)
            fs.pipe_file(key, data.encode("utf-8") if isinstance(data, str) else bytes(data))
        return
    target = Path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_lines_atomic(p, lines) -> int:
    """Write an iterable of text lines (newline added) to `p` as `write_atomic` does; the count written."""
    if is_remote(p):
        lines = list(lines)
        write_atomic(p, "".join(line + "\n" for line in lines))
        return len(lines)
    target = Path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with _builtin_open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
                count += 1
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def touch(p) -> None:
    """Mark existing file `p` as written now (a heartbeat): utime locally, the object rewritten with its
    own bytes in a bucket."""
    if not is_remote(p):
        os.utime(p)
        return
    write_atomic(p, read_bytes(p))


def create_exclusive(p, data: str | bytes) -> bool:
    """Create `p` holding `data` only if it does not exist: True if this call created it, False if it was
    there. Locally O_CREAT|O_EXCL; GCS `ifGenerationMatch=0`; S3 `If-None-Match: *` (the store decides, so two
    hosts racing get one True)."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if not is_remote(p):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        return True
    fs, key = filesystem(p)
    if fs.exists(key):  # stores that ignore the precondition (the GCS emulator) still refuse a second comer
        return False
    try:
        fs.pipe_file(key, raw, mode="create")
    except FileExistsError:
        return False
    except Exception as err:  # noqa: BLE001
        code = getattr(err, "code", None)
        response = getattr(err, "response", None)
        if code == 412 or isinstance(response, dict) and response.get("Error", {}).get("Code") in (
                "PreconditionFailed", "412", "ConditionalRequestConflict"):
            return False
        raise _fail(p, err) from None
    return True


def copytree(src, dst) -> None:
    """Copy directory `src` into `dst` (merging, any scheme to any scheme)."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    root, target = os.fspath(src).rstrip("/"), os.fspath(dst).rstrip("/")
    files = [] if is_remote(src) else [os.fspath(p) for p in Path(root).rglob("*") if p.is_file()]
    if is_remote(src):  # fsspec's find: epath's rglob refuses `**` in a bucket
        with reporting(src):
            fs, key = filesystem(src)
            files = [f"{scheme(src)}://{name}" for name in fs.find(key)]
    for name in files:
        copy(name, f"{target}/{name[len(root) + 1:]}")


def copy(src, dst) -> None:
    """Copy file `src` to `dst` (any scheme to any scheme)."""
    if not is_remote(src) and not is_remote(dst):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return
    if scheme(src) == scheme(dst):
        with reporting(src):
            fs, key = filesystem(src)
            fs.copy(key, filesystem(dst)[1])
        return
    write_atomic(dst, read_bytes(src))


def rename(src, dst) -> None:
    """Move file or directory `src` to `dst`: one rename locally; in a bucket the objects are copied
    (server side) and the originals removed, so `dst` appears object by object; writers that need it whole
    put a marker last (orbax's commit_success.txt, the convert index)."""
    if not is_remote(src) and not is_remote(dst):
        os.replace(src, dst)
        return
    if scheme(src) != scheme(dst):
        raise StorageError(f"{os.fspath(src)}: cannot move to {os.fspath(dst)} (another store)")
    with reporting(src):
        fs, key = filesystem(src)
        target = filesystem(dst)[1]
        if fs.isfile(key):
            fs.copy(key, target)
            fs.rm_file(key)
            return
        for name in fs.find(key):
            fs.copy(name, target + name[len(key):])
        _remove_objects(fs, key)


def _remove_objects(fs, key: str) -> None:
    """Delete every object under `key`, one request each (not every GCS-compatible server batches)."""
    for name in fs.find(key):
        fs.rm_file(name)
    fs.invalidate_cache()


def remove(p, missing_ok: bool = True) -> None:
    """Remove file `p`."""
    try:
        if not is_remote(p):
            os.remove(p)
            return
        with reporting(p):
            fs, key = filesystem(p)
            fs.rm_file(key)
    except (FileNotFoundError, StorageError):
        if not missing_ok or exists(p):
            raise


def rmtree(p, ignore_errors: bool = False) -> None:
    """Remove directory `p` and everything under it."""
    if not is_remote(p):
        shutil.rmtree(p, ignore_errors=ignore_errors)
        return
    try:
        with reporting(p):
            fs, key = filesystem(p)
            _remove_objects(fs, key)
    except StorageError:
        if not ignore_errors:
            raise


def staging_dir(dst):
    """A new empty directory beside `dst`, to be moved onto `dst` once complete (`rename`): on the same
    filesystem locally, a fresh prefix in the same bucket remotely."""
    if is_remote(dst):
        target = path(dst)
        return target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
