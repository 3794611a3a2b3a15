"""storage_credentials: an AwsCredentials block saved on a real Prefect API, used against moto."""

import json

import pytest

from helpers import pattern, to_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_api")]

SECRET = "block-secret-never-to-be-seen-7f3a"


def save_aws_credentials_block(name: str, endpoint: str, key_id: str = "block-key-id", **client_parameters) -> None:
    """What `AwsCredentials(...).save(name)` stores (prefect-aws's block type slug, secret fields
    marked), created through the API so the test needs no prefect-aws install. Saving an existing
    name again replaces its keys."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (BlockDocumentCreate, BlockDocumentUpdate, BlockSchemaCreate,
                                                BlockTypeCreate)
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            block_type = client.read_block_type_by_slug("aws-credentials")
        except ObjectNotFound:
            block_type = client.create_block_type(BlockTypeCreate(name="AWS Credentials", slug="aws-credentials"))
        schema = client.create_block_schema(BlockSchemaCreate(
            block_type_id=block_type.id, capabilities=[], version="test",
            fields={"title": "AwsCredentials", "type": "object", "block_type_slug": "aws-credentials",
                    "secret_fields": ["aws_secret_access_key", "aws_session_token"],
                    "block_schema_references": {},
                    "properties": {"aws_access_key_id": {"type": "string"},
                                   "aws_secret_access_key": {"type": "string", "format": "password",
                                                             "writeOnly": True},
                                   "region_name": {"type": "string"},
                                   "aws_client_parameters": {"type": "object"}}}))
        data = {"aws_access_key_id": key_id, "aws_secret_access_key": SECRET, "region_name": "us-east-1",
                "aws_client_parameters": {"endpoint_url": endpoint, **client_parameters}}
        try:
            existing = client.read_block_document_by_name(name, block_type_slug="aws-credentials")
        except ObjectNotFound:
            client.create_block_document(BlockDocumentCreate(
                name=name, block_type_id=block_type.id, block_schema_id=schema.id, data=data))
        else:
            client.update_block_document(existing.id, BlockDocumentUpdate(data=data, merge_existing_data=False))


@pytest.fixture
def reachable_only_through_the_block(bucket, s3_endpoint, monkeypatch, tmp_path):
    """A bucket with one content and one style image under in/c/ and in/s/, the block "nst-moto"
    pointing at it, and the endpoint and keys removed from the environment: only the block reaches it."""
    from tasks import storage

    name, client = bucket
    client.put_object(Bucket=name, Key="in/c/a.png", Body=to_bytes(pattern((40, 32), "content")))
    client.put_object(Bucket=name, Key="in/s/b.png", Body=to_bytes(pattern((32, 40), "style")))
    save_aws_credentials_block("nst-moto", s3_endpoint)
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    storage.clear_clients()
    yield name, client
    storage.clear_clients()


def test_a_run_uses_the_block_and_its_secret_goes_nowhere(reachable_only_through_the_block, caplog):
    """With the endpoint and keys removed from the environment, only the block can reach the
    moto server: the run completes through it. Old code: no such option (OutputSpec refused the
    field). The secret is in no sidecar, report, artifact or log line."""
    from flows.batch import stylize_batch
    from nst_core.params import StyleParams
    from tasks.models import BatchSource, OutputSpec, RunOptions

    name, client = reachable_only_through_the_block
    state = stylize_batch(
        BatchSource(contents=f"s3://{name}/in/c/", styles=f"s3://{name}/in/s/"),
        OutputSpec(uri=f"s3://{name}/out/", storage_credentials="nst-moto"),
        StyleParams(weights="random", image_size=32, iterations=3, scales=1), RunOptions(), return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    assert report["output"]["storage_credentials"] == "nst-moto"  # the name only

    objects = client.list_objects_v2(Bucket=name, Prefix="out/")["Contents"]
    assert any(o["Key"].endswith(".json") and "/_runs/" not in o["Key"] for o in objects)
    for o in objects:
        assert SECRET.encode() not in client.get_object(Bucket=name, Key=o["Key"])["Body"].read(), o["Key"]

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as api:
        arts = api.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert arts and all(SECRET not in json.dumps([a.data, a.description], default=str) for a in arts)
    assert SECRET not in caplog.text

    missing = stylize_batch(
        BatchSource(contents=f"s3://{name}/in/c/", styles=f"s3://{name}/in/s/"),
        OutputSpec(uri=f"s3://{name}/out2/", storage_credentials="no-such-block"), return_state=True)
    assert missing.is_failed() and "no aws-credentials block named 'no-such-block'" in missing.message


def test_an_endpoint_url_with_credentials_in_it_is_refused_without_echoing_them(tmp_path):
    """boto puts the endpoint URL into its connection errors ('Could not connect to the endpoint
    URL: "http://key:secret@..."'), which reached the preflight message, the log and the state.
    Old code: the run failed in preflight with the secret in its message. Now: refused by name."""
    from flows.batch import stylize_batch
    from tasks import storage
    from tasks.models import BatchSource, OutputSpec

    save_aws_credentials_block("nst-userinfo", f"http://block-key-id:{SECRET}@127.0.0.1:9")
    try:
        state = stylize_batch(
            BatchSource(contents="s3://b/in/c/", styles="s3://b/in/s/"),
            OutputSpec(uri="s3://b/out/", storage_credentials="nst-userinfo"), return_state=True)
        assert state.is_failed()
        assert SECRET not in (state.message or "")
        assert "nst-userinfo" in state.message and "endpoint_url" in state.message
    finally:
        storage.clear_clients()


def test_an_endpoint_variable_with_credentials_in_it_is_refused_without_echoing_them(monkeypatch):
    """The same leak through boto3's default chain: AWS_ENDPOINT_URL_S3=http://key:secret@host put
    the secret into the preflight message. Old code: it did; now the run is refused by the
    variable's name at entry."""
    from flows.batch import stylize_batch
    from tasks import storage
    from tasks.models import BatchSource, OutputSpec

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://key:{SECRET}@127.0.0.1:9")
    storage.clear_clients()
    try:
        state = stylize_batch(BatchSource(contents="s3://b/in/c/", styles="s3://b/in/s/"),
                              OutputSpec(uri="s3://b/out/"), return_state=True)
        assert state.is_failed()
        assert SECRET not in (state.message or "") and "AWS_ENDPOINT_URL_S3" in state.message
    finally:
        storage.clear_clients()


def test_a_block_without_an_endpoint_refuses_an_endpoint_variable_with_credentials_in_it(monkeypatch):
    """A block that gives no endpoint_url leaves boto to AWS_ENDPOINT_URL_S3: the variable's
    user:password@ reached the connection errors. Old code checked the variable only without a block."""
    from tasks import credentials

    save_aws_credentials_block("nst-no-endpoint", None)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://key:{SECRET}@127.0.0.1:9")
    with pytest.raises(credentials.CredentialsError, match="AWS_ENDPOINT_URL_S3") as caught:
        credentials.resolve("nst-no-endpoint")
    assert SECRET not in str(caught.value)

@pytest.mark.parametrize("endpoint", [f"minio:{SECRET}@minio.internal:9000", f"https:/minio:{SECRET}@minio.internal"])
def test_an_endpoint_without_its_scheme_or_slashes_is_refused_too_when_it_carries_credentials(monkeypatch, endpoint):
    """``host:9000`` as MinIO's docs print it, or ``https:/`` with a slash missing: no netloc for
    urlsplit, so the user:password@ check passed, and botocore's "Invalid endpoint: …" echoed the
    password into the preflight message (the old code)."""
    from tasks import credentials

    save_aws_credentials_block("nst-no-scheme", endpoint)
    with pytest.raises(credentials.CredentialsError, match="nst-no-scheme") as caught:
        credentials.resolve("nst-no-scheme")
    assert SECRET not in str(caught.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    with pytest.raises(credentials.CredentialsError, match="AWS_ENDPOINT_URL_S3") as caught:
        credentials.resolve("")
    assert SECRET not in str(caught.value)


def test_a_blocks_ca_bundle_is_used_where_prefect_aws_keeps_it(tmp_path):
    """prefect-aws keeps a private CA (a MinIO or Ceph behind the company's own CA) in
    ``aws_client_parameters.verify_cert_path`` and calls a path in ``verify`` deprecated. Old: only
    ``verify`` was read, so such a block verified against the public CAs and every request failed
    CERTIFICATE_VERIFY_FAILED."""
    from tasks.credentials import resolve

    bundle = tmp_path / "company-ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    save_aws_credentials_block("nst-private-ca", "https://minio.internal:9000", verify_cert_path=str(bundle))
    assert resolve("nst-private-ca").verify == str(bundle)
    save_aws_credentials_block("nst-no-verify", "https://minio.internal:9000", verify=False)
    assert resolve("nst-no-verify").verify is False
    save_aws_credentials_block("nst-default-verify", "https://minio.internal:9000")
    assert resolve("nst-default-verify").verify is True


def test_a_blocks_botocore_config_reaches_the_client_under_the_clients_own_timeouts():
    """Path-style addressing (many MinIO setups) set in the block's ``config``. Old: dropped
    without a word. A config botocore refuses fails the run by the block's name."""
    from tasks import storage
    from tasks.credentials import CredentialsError, resolve

    save_aws_credentials_block("nst-path-style", "http://127.0.0.1:9",
                               config={"s3": {"addressing_style": "path"}, "read_timeout": 3600})
    config = storage.s3_client(resolve("nst-path-style")).meta.config
    assert config.s3["addressing_style"] == "path"
    assert config.read_timeout == storage.S3_TIMEOUTS[1]  # bounded time stays the client's
    # refused by Config(), by botocore's own checks of it, and only when the client is built
    for bad in ({"no_such_setting": 1}, {"retries": {"mode": "bogus"}}, {"s3": "x"}, {"s3": {"addressing_style": "bogus"}}):
        save_aws_credentials_block("nst-bad-config", "http://127.0.0.1:9", config=bad)
        with pytest.raises(CredentialsError, match="nst-bad-config"):
            resolve("nst-bad-config")


def test_a_block_edited_between_runs_is_read_again_and_its_repr_shows_no_secret():
    """Rotated keys reach the next run: ``resolve`` reads the block each time. Old code: the first
    read was cached for the life of the process (``_loaded``), so a worker kept the old keys."""
    from tasks.credentials import resolve

    save_aws_credentials_block("nst-rotating", "http://127.0.0.1:9", key_id="first-key-id")
    first = resolve("nst-rotating")
    save_aws_credentials_block("nst-rotating", "http://127.0.0.1:9", key_id="second-key-id")
    second = resolve("nst-rotating")
    assert (first.access_key_id, second.access_key_id) == ("first-key-id", "second-key-id")
    assert first != second and second.secret_access_key == SECRET and second.endpoint_url == "http://127.0.0.1:9"
    assert SECRET not in repr(second) and "second-key-id" not in repr(second) and "nst-rotating" in repr(second)


def test_a_chunk_run_uses_the_block_its_output_names(reachable_only_through_the_block):
    """stylize-chunk (a GPU worker's run) resolves the parent's block from its OutputSpec: with the
    endpoint and keys gone from the environment, only the block reaches the bucket."""
    from flows.chunk import stylize_chunk
    from tasks.credentials import resolve
    from tasks.models import BatchSource, OutputSpec, RunOptions
    from tasks.plan import plan_pairs, source_entries

    from helpers import tiny_params

    name, client = reachable_only_through_the_block
    credentials = resolve("nst-moto")
    source = BatchSource(contents=f"s3://{name}/in/c/", styles=f"s3://{name}/in/s/")
    output = OutputSpec(uri=f"s3://{name}/out/", storage_credentials="nst-moto")
    plans = plan_pairs(source_entries(source, credentials), tiny_params(), "random(seed=0)", output.format,
                       output.quality, credentials=credentials)
    result = stylize_chunk(plans, output, tiny_params(), RunOptions(allowed_sources=[f"s3://{name}/in/"]),
                           "random(seed=0)", "_runs/parent/chunk-x.json")
    assert result["done"] == 1, result
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=name, Prefix="out/")["Contents"]}
    assert {f"out/{plans[0].image_key}", f"out/{plans[0].sidecar_key}", "out/_runs/parent/chunk-x.json"} <= keys
