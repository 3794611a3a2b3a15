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
