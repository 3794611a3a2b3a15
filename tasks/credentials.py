"""Storage credentials from a Prefect ``AwsCredentials`` block (prefect-aws), next to boto3's chain.

``OutputSpec.storage_credentials`` names the block ("" = boto3's default chain: instance role,
~/.aws, AWS_* variables). A flow run ``activate``s it on entry; ``client_options`` then gives
tasks/storage.py the session arguments and endpoint for every S3 client of that process.

The block is read as a block document (``aws-credentials`` type, secrets included) through the
Prefect API, so a worker needs prefect-aws only to *create* such blocks (``pip install
'prefect-nst[aws]'``; the UI's Blocks page offers the type once it is registered), not to use
them. The secret values live only in memory here: they are never logged, and nothing this
package writes (sidecars, reports, artifacts) records more than the block's name.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["BLOCK_TYPE", "CredentialsError", "activate", "active_block", "client_options", "load_block"]

#: The block type slug prefect-aws registers for AwsCredentials.
BLOCK_TYPE = "aws-credentials"

_lock = threading.Lock()
_active: str = ""
_loaded: dict[str, dict[str, Any]] = {}


class CredentialsError(ValueError):
    """The named credentials block cannot be used; the message names the block, never a secret."""


def _secret(value: Any) -> str | None:
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    return getter() if getter else str(value)


def _has_userinfo(url: Any) -> bool:
    from urllib.parse import urlsplit

    if not isinstance(url, str) or not url:
        return False
    try:
        return "@" in urlsplit(url).netloc
    except ValueError:
        return True  # unparsable: refuse rather than let boto print it


def load_block(name: str) -> dict[str, Any]:
    """Session arguments and endpoint from the ``aws-credentials`` block ``name`` (cached per process)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with _lock:
        if name in _loaded:
            return _loaded[name]
    try:
        with get_client(sync_client=True) as client:
            doc = client.read_block_document_by_name(name, block_type_slug=BLOCK_TYPE, include_secrets=True)
    except ObjectNotFound:
        raise CredentialsError(
            f"storage_credentials: no {BLOCK_TYPE} block named {name!r} on the Prefect server "
            "(create one on the UI's Blocks page, or leave it empty for boto3's default chain)"
        ) from None
    data = doc.data or {}
    session = {
        "aws_access_key_id": data.get("aws_access_key_id"),
        "aws_secret_access_key": _secret(data.get("aws_secret_access_key")),
        "aws_session_token": _secret(data.get("aws_session_token")),
        "profile_name": data.get("profile_name"),
        "region_name": data.get("region_name"),
    }
    params = data.get("aws_client_parameters") or {}
    if _has_userinfo(params.get("endpoint_url")):
        # boto echoes the endpoint URL in connection errors, which land in logs, reports and state messages
        raise CredentialsError(
            f"storage_credentials: the endpoint_url of block {name!r} carries a user name or password "
            "(user:password@host); put the keys in the block's key fields and give endpoint_url without them"
        )
    options = {"session": {k: v for k, v in session.items() if v}, "endpoint_url": params.get("endpoint_url") or None,
               "verify": params.get("verify", True) if params.get("verify") is not None else True}
    with _lock:
        _loaded[name] = options
    return options


def activate(name: str) -> None:
    """Make block ``name`` ("" = boto3's default chain) the credentials of this process's S3 clients.

    Loads (and so checks) the block first: a missing block fails the run at once, by name.
    """
    global _active
    if name:
        load_block(name)
    else:
        import os

        for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if _has_userinfo(os.environ.get(var)):  # boto would echo it in every connection error
                raise CredentialsError(
                    f"{var} carries a user name or password (user:password@host); give the endpoint without "
                    "them and the keys through boto3's credential chain or a storage_credentials block"
                )
    with _lock:
        _active = name


def active_block() -> str:
    return _active


def client_options() -> tuple[str, dict[str, Any]]:
    """(block name, options) for building an S3 client now: ``{}`` means boto3's default chain."""
    name = _active
    if not name:
        return "", {}
    return name, load_block(name)
