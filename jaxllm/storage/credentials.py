"""Whether the client of a bucket has credentials, decided before it sends anything.

Left alone, gcsfs falls back to anonymous access when Google's search for credentials finds none (and real GCS
answers later with a confusing 401, or serves public objects only); botocore raises only when it signs the
first request. jaxllm asks the same searches first (google.auth.default(), botocore's credential chain: the
environment, files, and the metadata server of a VM), so a path in a bucket without credentials is refused in
one line that says how to supply them, before a request leaves the machine.
"""
from __future__ import annotations

import logging
import os

GCS_HOW = "set GOOGLE_APPLICATION_CREDENTIALS=/path/key.json or run `gcloud auth application-default login`"
S3_HOW = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or write ~/.aws/credentials"
_found: set[str] = set()  # schemes whose credentials were found once: the search may ask a metadata server


def missing(name: str) -> str | None:
    """None when scheme `name` ("gs", "s3") may send requests, else what is wrong and how to fix it."""
    from fsspec.config import conf

    if name == "gs":
        configured = {**conf.get("gcs", {}), **conf.get("gs", {})}
        # the emulator takes anonymous requests; a token given to fsspec (FSSPEC_GS_TOKEN, "anon" too) is used as is
        if os.environ.get("STORAGE_EMULATOR_HOST") or configured.get("token") is not None or name in _found:
            return None
        why = _google()
    elif name == "s3":
        configured = {**conf.get("s3a", {}), **conf.get("s3", {})}
        if any(configured.get(k) for k in ("anon", "key", "token", "session")) or name in _found:
            return None
        why = _aws(configured.get("profile"))
    else:
        return None
    if why is None:
        _found.add(name)
    return why


def _google() -> str | None:
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    quiet = logging.getLogger("google.auth._default")  # its warning per place searched: the line below says it
    level, quiet.level = quiet.level, logging.ERROR
    try:
        google.auth.default()
    except DefaultCredentialsError:
        named = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if named and not os.path.exists(named):
            return f"no Google Cloud credentials: GOOGLE_APPLICATION_CREDENTIALS names {named}, which does not exist"
        return f"no Google Cloud credentials found: {GCS_HOW}"
    finally:
        quiet.setLevel(level)
    return None


def _aws(profile: str | None) -> str | None:
    import botocore.session
    from botocore.exceptions import BotoCoreError

    try:
        found = botocore.session.Session(profile=profile).get_credentials()
    except BotoCoreError as err:  # e.g. AWS_PROFILE names a profile no file defines
        return f"no AWS credentials: {' '.join(str(err).split())}"
    return None if found is not None else f"no AWS credentials found: {S3_HOW}"
