"""The batch models' URI checks: what they refuse in one line, and what users legitimately write."""

import pytest
from pydantic import ValidationError

from tasks.models import OutputSpec, PrefixSource


@pytest.mark.parametrize("uri", [
    "s3://bucket/prefix/", "s3://Legacy_Bucket.1/x", "out", "./out:2", "/abs/out", "file:///abs/out",
    "C:\\data\\out", "C:/data/out",
    # an access point ARN is a Bucket to boto3 (the first version of the bucket check refused it)
    "s3://arn:aws:s3:us-west-2:123456789012:accesspoint:my-ap/prefix/",
])
def test_uris_users_write_are_accepted(uri):
    assert OutputSpec(uri=uri).uri == uri


@pytest.mark.parametrize("uri,message", [
    ("s3://", "names no bucket"), ("s3://Bad_Bucket!/x", "is not an S3 bucket name"),
    ("file://host/x", "a file URI with a host"), ("gs://b/x", "unsupported scheme 'gs'"),
    ("s3://arn:aws:s3:us-west-2:123456789012:accesspoint/my-ap/x", "accesspoint:NAME"),
])
def test_uris_no_storage_can_use_are_refused_in_one_line(uri, message):
    with pytest.raises(ValidationError, match=message):
        PrefixSource(contents=uri, styles="s")


def test_storage_credentials_take_a_block_name_and_never_echo_what_was_typed():
    """Keys pasted into the field (the UI's form, --storage-credentials) were stored as the run's
    parameters and echoed in "no aws-credentials block named '{...secret...}'": logs, state, UI."""
    from tasks.models import InvalidInputs, batch_inputs

    typed = '{"aws_access_key_id": "AKIAEXAMPLE", "aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG"}'
    with pytest.raises(InvalidInputs) as err:
        batch_inputs({"contents": "c", "styles": "s"}, {"uri": "out", "storage_credentials": typed}, {}, {})
    assert "output.storage_credentials" in str(err.value) and "K7MDENG" not in str(err.value), err.value
    assert OutputSpec.model_json_schema()["properties"]["storage_credentials"]["pattern"] == "^[a-z0-9-]*$"
    assert OutputSpec(uri="out", storage_credentials="minio-nightly").storage_credentials == "minio-nightly"


def test_an_invalid_uri_is_named_without_its_password():
    from tasks.models import InvalidInputs, batch_inputs

    with pytest.raises(InvalidInputs) as err:
        batch_inputs({"manifest": "https://alice:s3cret@example.com/pairs.jsonl"}, {"uri": "out"}, {}, {})
    assert "unsupported scheme" in str(err.value) and "s3cret" not in str(err.value), err.value


@pytest.mark.parametrize("uri", ["o\0x", "file:///tmp/o%00x", "s3://bucket/o\0x"])
def test_a_nul_in_a_uri_is_refused_in_one_line(uri):
    """Old: accepted, then "ValueError: embedded null byte" from the storage, a traceback, exit 1."""
    with pytest.raises(ValidationError, match="NUL"):
        OutputSpec(uri=uri)
    with pytest.raises(ValidationError, match="NUL"):
        PrefixSource(contents=uri, styles="s")
