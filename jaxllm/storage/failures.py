"""What went wrong with a bucket request, in a few words (the part of a StorageError after the path)."""
from __future__ import annotations

from jaxllm.storage.credentials import GCS_HOW, S3_HOW

# Exception names (any module: aiohttp, botocore, requests, urllib3, builtins) that mean the server was not
# reached or the connection broke: the network, not the request.
_UNREACHABLE = {"ClientConnectorError", "ClientOSError", "ServerDisconnectedError", "ClientPayloadError",
                "ConnectionRefusedError", "ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError",
                "ConnectionError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                "ConnectTimeoutError", "TimeoutError", "ServerTimeoutError", "ProtocolError"}
# TensorStore's status codes for the same (its errors are ValueErrors whose text starts with the code)
_TS_UNREACHABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def describe(err: BaseException, scheme: str = "") -> str:
    """What went wrong with a bucket request, in a few words."""
    code = getattr(err, "code", None) or getattr(err, "status", None)
    text = str(err)
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = code or response.get("Error", {}).get("Code")
    name = type(err).__name__
    if name in ("NoCredentialsError", "DefaultCredentialsError", "RefreshError") or code in (401, "401") \
            or "credentials" in text.lower() and "not found" in text.lower():
        how = {"gs": GCS_HOW, "s3": S3_HOW}.get(scheme, "see docs/storage.md")
        return f"no credentials ({how})"
    if code in (403, "403", "AccessDenied", "AllAccessDisabled") or isinstance(err, PermissionError):
        return "permission denied"
    if code in ("NoSuchBucket",) or "bucket does not exist" in text.lower() or "nosuchbucket" in text.lower():
        return "the bucket does not exist"
    broken = unreachable(err)
    if broken is not None:
        return f"the storage server cannot be reached ({broken})"
    return (text.splitlines() or [name])[0][:200]


def unreachable(err: BaseException) -> str | None:
    """The network failure in `err` or its causes, in a few words; None when it is not one."""
    seen, queue = set(), [err]
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        text = " ".join(str(current).split())
        if type(current).__name__ in _UNREACHABLE or text.startswith(_TS_UNREACHABLE):
            return _short(current, text)
        queue.extend(getattr(current, "exceptions", ()) or ())
        queue.extend([current.__cause__, current.__context__])
    return None


def _short(err: BaseException, text: str) -> str:
    lowered = text.lower()
    for words in ("connection refused", "connection reset", "timed out", "server disconnected",
                  "connect call failed"):
        if words in lowered:
            return "connection refused" if words == "connect call failed" else words
    return (text.split(" [")[0] or type(err).__name__)[:120]
