"""One reading of a storage URI; a local one made absolute for another process."""

import pytest

from nst_core.uris import absolute_local


@pytest.mark.parametrize("uri,absolute", [
    ("out", "/work/out"), ("./out/", "/work/out"), ("file:///abs/p%20q", "/abs/p q"), ("/x/./y//z", "/x/y/z"),
    # ".." stays: through a link, "link/.." is the link target's parent, where abspath said this folder
    ("link/../w.pth", "/work/link/../w.pth"),
    ("s3://bucket/out", "s3://bucket/out"), ("file://host/x", "file://host/x"), ("", ""),
])
def test_a_local_place_is_made_absolute_as_the_file_system_reads_it(monkeypatch, uri, absolute):
    monkeypatch.setattr("os.getcwd", lambda: "/work")
    assert absolute_local(uri) == absolute
