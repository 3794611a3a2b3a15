"""Storage credentials as a value: a Prefect ``AwsCredentials`` block (prefect-aws), or boto3's chain.

``OutputSpec.storage_credentials`` names the block ("" = boto3's default chain: instance role,
~/.aws, AWS_* variables). A flow run ``resolve``s that name once, on entry, into a frozen
``StorageCredentials`` and passes it to everything that touches storage (``open_storage(uri,
credentials)``, ``read_uri``, ``PairContext``); tasks/storage.py caches one boto3 client per
credentials value (its hash). Nothing here is process-global: two runs in one process with two
blocks each sign with their own keys, and a block edited between runs is read again.

The block is read as a block document (``aws-credentials`` type, secrets included) through the
Prefect API, so a worker needs prefect-aws only to *create* such blocks (``pip install
'prefect-nst[aws]'``; the UI's Blocks page offers the type once it is registered), not to use
them. The secret values live only in memory: the repr leaves them out, nothing logs them, and
nothing this package writes (sidecars, reports, artifacts) records more than the block's name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BLOCK_TYPE", "CredentialsError", "CREDENTIALS_REFUSED", "StorageCredentials", "DEFAULT_CHAIN", "resolve"]

#: The block type slug prefect-aws registers for AwsCredentials.
BLOCK_TYPE = "aws-credentials"


class CredentialsError(ValueError):
    """The named credentials block cannot be used; the message names the block, never a secret."""


#: How a run refused for its credentials starts its Failed message (the CLI exits 2 on it).
CREDENTIALS_REFUSED = "cannot use the storage credentials:"


@dataclass(frozen=True)
class StorageCredentials:
    """What an S3 client is built from. Frozen and hashed by its values (clients are cached by it);
    the key fields are left out of the repr, so printing or logging one shows no secret."""

    block: str = ""  # the block's name, the only part ever recorded; "" = boto3's default chain
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    profile_name: str | None = None
    region_name: str | None = None
    endpoint_url: str | None = None  # None: boto3's own (AWS_ENDPOINT_URL_S3, ~/.aws/config, AWS)
    verify: bool | str = True  # TLS verification, or a CA bundle path
    #: the block's botocore settings (``aws_client_parameters.config``, e.g. path-style addressing),
    #: as sorted JSON so the value stays hashable; the S3 client's own timeouts and retries win over it
    client_config: str = ""

    def session_args(self) -> dict[str, str]:
        """Keyword arguments of ``boto3.session.Session`` (only those set)."""
        args = {"aws_access_key_id": self.access_key_id, "aws_secret_access_key": self.secret_access_key,
                "aws_session_token": self.session_token, "profile_name": self.profile_name,
                "region_name": self.region_name}
        return {k: v for k, v in args.items() if v}


#: boto3's default credential chain, with its own endpoint resolution.
DEFAULT_CHAIN = StorageCredentials()


def _secret(value: Any) -> str | None:
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    return getter() if getter else str(value)


def _has_userinfo(url: Any) -> bool:
    """Whether an endpoint URL may carry ``user:password@``. Any "@" counts, not only one in the
    netloc: ``minio:pw@host:9000`` (no scheme) or ``https:/u:pw@host`` has none for urlsplit, and
    botocore's "Invalid endpoint: …" echoes it whole. An S3 endpoint has no other use for "@"."""
    return isinstance(url, str) and "@" in url


def _check_environment() -> None:
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if _has_userinfo(os.environ.get(var)):  # boto would echo it in every connection error
            raise CredentialsError(
                f"{var} carries a user name or password (user:password@host); give the endpoint without "
                "them and the keys through boto3's credential chain or a storage_credentials block"
            )


def _read_block(name: str) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            doc = client.read_block_document_by_name(name, block_type_slug=BLOCK_TYPE, include_secrets=True)
    except ObjectNotFound:
        raise CredentialsError(
            f"storage_credentials: no {BLOCK_TYPE} block named {name!r} on the Prefect server "
            "(create one on the UI's Blocks page, or leave it empty for boto3's default chain)"
        ) from None
    return doc.data or {}


def resolve(name: str) -> StorageCredentials:
    """The credentials block ``name`` read now ("" = ``DEFAULT_CHAIN``), checked: a missing block, or
    an endpoint URL with ``user:password@`` in it (boto echoes endpoint URLs into its errors, which
    reach logs, reports and state messages), raises ``CredentialsError`` naming only the block or
    the variable. Read on every call, never cached: a flow run resolves once, on entry."""
    if not name:
        _check_environment()
        return DEFAULT_CHAIN
    data = _read_block(name)
    params = data.get("aws_client_parameters") or {}
    if _has_userinfo(params.get("endpoint_url")):
        raise CredentialsError(
            f"storage_credentials: the endpoint_url of block {name!r} carries a user name or password "
            "(user:password@host); put the keys in the block's key fields and give endpoint_url without them"
        )
    if not params.get("endpoint_url"):  # boto falls back to the environment's endpoint
        _check_environment()
    # prefect-aws keeps a CA bundle in verify_cert_path (a path in verify is its deprecated form) and
    # ignores it when verify is False, as boto3 gets it from AwsClientParameters
    verify = params.get("verify")
    if params.get("verify_cert_path") and verify is not False:
        verify = params["verify_cert_path"]
    credentials = StorageCredentials(
        block=name,
        access_key_id=data.get("aws_access_key_id") or None,
        secret_access_key=_secret(data.get("aws_secret_access_key")) or None,
        session_token=_secret(data.get("aws_session_token")) or None,
        profile_name=data.get("profile_name") or None,
        region_name=data.get("region_name") or None,
        endpoint_url=params.get("endpoint_url") or None,
        verify=True if verify is None else verify,
        client_config=json.dumps(params["config"], sort_keys=True) if params.get("config") else "",
    )
    if credentials.client_config:  # built here (no network), so a config botocore refuses fails by the block's name
        from .storage import s3_client

        try:
            s3_client(credentials)
        except Exception as err:
            raise CredentialsError(f"storage_credentials: block {name!r}: its aws_client_parameters give no S3 client: "
                                   f"{type(err).__name__}: {err}") from None
    return credentials
