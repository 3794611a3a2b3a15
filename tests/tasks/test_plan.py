import dataclasses
import json

import pytest

from tasks.models import BatchSource
from nst_core import StyleParams
from tasks.contract import pair_key
from tasks.plan import PreflightError, default_allowed_sources, plan_pairs, read_manifest, source_entries

from helpers import pattern, to_bytes


@pytest.fixture
def folders(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / name).write_bytes(to_bytes(pattern((16, 16))) if name != "notes.txt" else b"x")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "s1.png").write_bytes(to_bytes(pattern((16, 16), "style")))
    return tmp_path


def test_cross_is_style_major_and_images_only(folders):
    entries = source_entries(BatchSource(contents=str(folders / "c"), styles=str(folders / "s")))
    assert [(e.content.rsplit("/", 1)[1], e.style.rsplit("/", 1)[1]) for e in entries] == [
        ("a.jpg", "s1.png"), ("b.png", "s1.png")]


def test_zip_needs_equal_counts(folders):
    with pytest.raises(PreflightError, match="zip.*2 content images.*1 style"):
        source_entries(BatchSource(contents=str(folders / "c"), styles=str(folders / "s"), pairing="zip"))


def test_empty_source_is_a_preflight_error(folders):
    (folders / "empty").mkdir()
    with pytest.raises(PreflightError, match="no image files"):
        source_entries(BatchSource(contents=str(folders / "empty"), styles=str(folders / "s")))


def test_a_manifest_entry_above_its_folder_is_judged_by_allowed_sources_and_fails_alone(folders):
    """Old: one "../" in a row's content or style refused the whole manifest before any work,
    though a manifest in manifests/ beside images/ is a common layout, and the module promises an
    unsafe entry fails its pair alone."""
    (folders / "m").mkdir()
    (folders / "m" / "m.jsonl").write_text(
        json.dumps({"content": "../c/a.jpg", "style": "../s/s1.png"}) + "\n"
        + json.dumps({"content": "c.png", "style": "../s/s1.png"}) + "\n")
    (folders / "m" / "c.png").write_bytes(to_bytes(pattern((16, 16))))
    from tasks.plan import _resolve

    source = BatchSource(manifest=str(folders / "m" / "m.jsonl"))
    entries = source_entries(source)
    assert [e.content for e in entries] == [str(folders / "c" / "a.jpg"), str(folders / "m" / "c.png")]
    assert _resolve("c\\a.jpg", str(folders / "m")) == str(folders / "m" / "c" / "a.jpg")  # written on Windows
    plans = plan_pairs(entries, StyleParams(), "w", "png", allowed_sources=default_allowed_sources(source))
    assert "outside allowed_sources" in plans[0].error and "outside allowed_sources" in plans[1].error
    plans = plan_pairs(entries, StyleParams(), "w", "png", allowed_sources=[str(folders)])
    assert [p.error for p in plans] == ["", ""]


def test_a_manifest_entry_above_its_bucket_fails_its_pair_alone():
    from tasks.plan import _resolve
    from tasks.storage import UnsafeKeyError

    assert _resolve("../images/a.png", "s3://b/manifests/") == "s3://b/images/a.png"
    # relative entries read as paths, as they always did: ".", "//" and a backslash fold
    assert _resolve("./c//a.png", "s3://b/m/") == _resolve("c\\a.png", "s3://b/m/") == "s3://b/m/c/a.png"
    with pytest.raises(UnsafeKeyError, match="outside"):
        _resolve("../../a.png", "s3://b/m/")


@pytest.mark.parametrize("base", ["s3://b/manifests/", "/data/manifests"])
def test_a_manifest_entry_of_a_scheme_the_tool_cannot_read_fails_alone_saying_so(folders, base):
    """A CDN's https:// URL or a gs:// one in a manifest. Old: read as a path under the manifest's
    folder, so the pair failed over a file the user never wrote ("no such file:
    /data/manifests/https:/cdn.example.com/a.jpg"), or over allowed_sources."""
    from tasks.plan import _resolve
    from tasks.storage import UnsafeKeyError

    for entry in ("https://cdn.example.com/img/a.jpg", "gs://bucket/a.jpg"):
        with pytest.raises(UnsafeKeyError, match=f"{entry.split(':')[0]}://.*s3:// URIs, local paths"):
            _resolve(entry, base)
    assert _resolve("photo:2.png", "/data/m") == "/data/m/photo:2.png"  # a colon in a file name is no scheme
    (folders / "m.jsonl").write_text(json.dumps({"content": "https://cdn.example.com/a.jpg", "style": "s/s1.png"})
                                     + "\n" + json.dumps({"content": "c/a.jpg", "style": "s/s1.png"}) + "\n")
    entries = read_manifest(str(folders / "m.jsonl"))
    assert "line 1" in entries[0].error and "https://" in entries[0].error and not entries[1].error


def test_a_refused_manifest_entry_keeps_no_password_of_its_url(folders):
    """The refused entry was kept as written for the pair's report line, log line and the summary's
    Failures: "https://alice:s3cret@images.example.com/c.png" with its password."""
    (folders / "m.jsonl").write_text(json.dumps({"content": "https://alice:s3cret@images.example.com/c.png",
                                                 "style": "s/s1.png"}) + "\n")
    (entry,) = read_manifest(str(folders / "m.jsonl"))
    assert entry.error and "s3cret" not in entry.content + entry.error
    assert entry.content == "https://images.example.com/c.png"


def test_in_a_folder_an_output_under_another_outputs_file_fails_at_planning(folders):
    """Manifest outputs "o/x" and "o/x.png/y": in a folder the second needs a folder where the first
    is a file. Old: planned, optimized, then failed at its write. On S3 both keys are fine."""
    (folders / "m.csv").write_text("content,style,output\nc/a.jpg,s/s1.png,o/x\nc/b.png,s/s1.png,o/x.png/y\n")
    entries = read_manifest(str(folders / "m.csv"))
    plans = plan_pairs(entries, StyleParams(), "w", "png", tree=True)
    assert not plans[0].error and plans[0].image_key == "o/x.png"
    assert "line 3: o/x.png/y.png needs a folder o/x.png where the output of manifest m.csv line 2 is a file" in \
        plans[1].error, plans[1].error
    assert plans[1].key == ""
    assert [p.error for p in plan_pairs(entries, StyleParams(), "w", "png", tree=False)] == ["", ""]


def test_manifest_csv_and_jsonl(folders):
    (folders / "m.csv").write_text("content,style,output\nc/a.jpg,s/s1.png,\nc/b.png,s/s1.png,named/out\n")
    rows = read_manifest(str(folders / "m.csv"))
    assert rows[0].content == f"{folders}/c/a.jpg" and rows[0].output is None and rows[1].output == "named/out"
    (folders / "m.jsonl").write_text(json.dumps({"content": str(folders / "c/a.jpg"), "style": "s/s1.png"}) + "\n\n")
    assert read_manifest(str(folders / "m.jsonl"))[0].content == str(folders / "c/a.jpg")



def test_a_jsonl_manifest_splits_rows_on_newlines_only(folders):
    """json.dumps(ensure_ascii=False) writes U+2028 and U+0085 as they are inside strings; splitlines
    broke the row there and the whole manifest was refused as "not JSON". Windows line ends still split."""
    rows = [{"content": "c/a.jpg", "style": "s/s1.png", "output": f"named/x{sep}y"} for sep in ("\u2028", "\x85")]
    (folders / "m.jsonl").write_bytes("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode())
    assert [r.output for r in read_manifest(str(folders / "m.jsonl"))] == ["named/x\u2028y", "named/x\x85y"]


def test_a_jsonl_manifest_with_cr_line_ends_reads_as_written(folders):
    """The README promises CR line ends: a JSONL saved with them was refused "line 1: not JSON (Extra
    data)". A lone CR cannot be inside a JSON string (control characters are escaped there)."""
    rows = [{"content": "c/a.jpg", "style": "s/s1.png", "output": f"x{i}"} for i in range(2)]
    (folders / "m.jsonl").write_bytes("\r".join(json.dumps(r) for r in rows).encode() + b"\r")
    assert [r.output for r in read_manifest(str(folders / "m.jsonl"))] == ["x0", "x1"]


@pytest.mark.parametrize("text,message", [
    ('{"content": "c/a.jpg"}\n', "line 1: needs non-empty 'content' and 'style'"),
    ('{"content": "c/a.jpg", "style": "s.png"}\nnot json\n', "line 2: not JSON"),
    ("", "is empty"),
    ("\n\n", "is empty"),
    # old: written as "True.jpg" and "['a'].jpg"; false and 0 were dropped without a word
])
def test_bad_manifests_name_the_line(folders, text, message):
    (folders / "m.jsonl").write_text(text)
    with pytest.raises(PreflightError, match=message):
        read_manifest(str(folders / "m.jsonl"))


@pytest.mark.parametrize("data", [
    "Content,Style,Output\r\nc/a.jpg,s/s1.png,x\r\n".encode(),  # a capitalised header
    "\ufeffcontent;style;output\r\nc/a.jpg;s/s1.png;x\r\n".encode(),  # Excel in a locale whose list separator is ";"
    "content\tstyle\toutput\nc/a.jpg\ts/s1.png\tx\n".encode(),  # tab-separated, saved as .csv
    "content,style,output\r\nc/a.jpg,s/s1.png,x\r\n".encode("utf-16"),  # Excel's "Unicode Text"
    'content;style;output;"notes, free"\nc/a.jpg;s/s1.png;x;"a, b"\n'.encode(),  # a comma inside a quoted name
])
def test_a_csv_manifest_saved_by_a_spreadsheet_reads_as_written(folders, data):
    """Old: "CSV header must name content,style[,output]" for Content,Style or semicolons, and
    "cannot read: 'utf-8' codec can't decode byte 0xff" for UTF-16."""
    (folders / "m.csv").write_bytes(data)
    (row,) = read_manifest(str(folders / "m.csv"))
    assert (row.content, row.style, row.output) == (f"{folders}/c/a.jpg", f"{folders}/s/s1.png", "x")


@pytest.mark.parametrize("data", [
    b"content,style,output\rc/a.jpg,s/s1.png,x\r",  # Excel for Mac's "CSV (Macintosh)": CR line ends
    b"\n\ncontent,style,output\nc/a.jpg,s/s1.png,x\n",  # blank lines before the header
])
def test_a_csv_manifest_with_odd_line_ends_reads_as_written(folders, data):
    """Old: CR-only lines raised _csv.Error (a traceback, the run "crashed"); blank lines before the
    header refused the manifest at "line 2", a line that has content and style."""
    (folders / "m.csv").write_bytes(data)
    (row,) = read_manifest(str(folders / "m.csv"))
    assert (row.content, row.style, row.output) == (f"{folders}/c/a.jpg", f"{folders}/s/s1.png", "x")


@pytest.mark.parametrize("name,data,message", [
    ("m.csv", b"content,style\nc/a.jpg," + b"s" * 200_000 + b"\n", r"m.csv line 2: not CSV \(field larger"),
    ("m.jsonl", b"[" * 100_000 + b"\n", r"m.jsonl line 1: not JSON"),
    ("m.jsonl", b'{"content": "c/a.jpg", "style": ' + b"9" * 5000 + b"}\n", r"m.jsonl line 1: not JSON"),
])
def test_a_manifest_the_parser_cannot_read_is_refused_in_one_line(folders, name, data, message):
    """Old: _csv.Error, RecursionError and ValueError escaped read_manifest: a traceback and a
    crashed run, where a bad manifest is refused before any work with its line."""
    (folders / name).write_bytes(data)
    with pytest.raises(PreflightError, match=message):
        read_manifest(str(folders / name))


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_a_manifest_that_is_not_utf8_says_so(folders, bom):
    (folders / "m.csv").write_bytes(bom + "content,style,output\n\u00e9c/a.jpg,s/s1.png,x\n".encode("latin-1"))
    with pytest.raises(PreflightError, match=r"m.csv: not UTF-8 text \(line 2: .*\); save it as UTF-8"):
        read_manifest(str(folders / "m.csv"))


@pytest.mark.parametrize("text", ["", "\ufeff", " \r\n\r\n"])
def test_an_empty_csv_manifest_says_it_is_empty(folders, text):
    """Old: "CSV header must name content,style[,output]", as if the header were wrong."""
    (folders / "m.csv").write_text(text)
    with pytest.raises(PreflightError, match="m.csv is empty"):
        read_manifest(str(folders / "m.csv"))


def test_output_names_and_keys(folders):
    params = StyleParams(weights="random")
    entries = source_entries(BatchSource(contents=str(folders / "c"), styles=str(folders / "s")))
    plans = plan_pairs(entries, params, "random(seed=0)", "jpeg")
    assert plans[0].image_key == f"a__s1__{plans[0].key[:8]}.jpg" and plans[0].sidecar_key.endswith(".json")
    # same inputs and params -> same key; any param (but device) or the weights -> another key
    again = plan_pairs(entries, params.model_copy(update={"device": "cpu"}), "random(seed=0)", "jpeg")
    assert [p.key for p in again] == [p.key for p in plans]
    assert plan_pairs(entries, params.model_copy(update={"iterations": 7}), "random(seed=0)", "jpeg")[0].key != plans[0].key
    assert plan_pairs(entries, params, "sha256:abc", "jpeg")[0].key != plans[0].key
    # the key follows the bytes, not the file name
    (folders / "c" / "a.jpg").write_bytes(to_bytes(pattern((16, 16), "rings")))
    assert plan_pairs(entries, params, "random(seed=0)", "jpeg")[0].key != plans[0].key
    assert pair_key("x", "y", params, "w", "jpeg", 92) == pair_key("x", "y", params, "w", "jpeg", 92)
    # the output encoding is part of what a result is
    assert plan_pairs(entries, params, "random(seed=0)", "png")[0].key != plans[0].key
    assert plan_pairs(entries, params, "random(seed=0)", "jpeg", quality=50)[0].key != plans[0].key
    with pytest.raises(ValueError, match="identities"):
        pair_key("", "y", params, "w", "jpeg", 92)  # never hash an empty identity


@pytest.mark.parametrize("output", ["_runs/x", ".nst-tmp/x", ".nst-tmp/sub/x", "_RUNS/x", ".NST-Tmp/x"])
def test_reserved_output_names_are_rejected(folders, output):
    """_runs/ holds the reports; .nst-tmp/ the temp files, which every run's clean_temp removes
    (a result there was redone every run; one in a subfolder made clean_temp fail every run after).
    In any case: on macOS's and Windows' folders "_RUNS/x" is in _runs/ (old: accepted, and could
    replace a run report; ".NST-TMP/x" was made and deleted every night). The row fails alone."""
    (folders / "m.csv").write_text(f"content,style,output\nc/a.jpg,s/s1.png,{output}\nc/b.png,s/s1.png,fine\n")
    plans = plan_pairs(read_manifest(str(folders / "m.csv")), StyleParams(), "w", "png")
    assert "line 2" in plans[0].error and output.split("/")[0] + "/" in plans[0].error and plans[0].key == ""
    assert not plans[1].error and plans[1].name == "fine"


@pytest.mark.parametrize("output, message", [
    (".nst-tmp-x", "temp files, which listings skip"), ("sub/.nst-tmp-y.png", "temp files, which listings skip"),
    ("..png", "no file name under the output"), ("a/..png", "no file name under the output"),
    ("...png", "no file name under the output"), ("/".join(["d" * 200] * 5), "at most 960 fit")])
def test_an_output_name_no_run_could_find_again_or_write_fails_alone_at_planning(folders, output, message):
    """Old: a file name starting with .nst-tmp- was written, but local listings skip such files (not
    folders: `.nst-tmp-old/x` is a name like any other), so every
    rerun claimed and redid it ("made by another run meanwhile"); `..png` was written as `..png`
    locally and refused by a worker's chunk run; a 1000-byte name of short folders failed at the
    write, after its optimization, on every run. The chunk's check is the plan's."""
    from tasks.contract import naming_problem

    rows = [{"content": "c/a.jpg", "style": "s/s1.png", "output": output}, {"content": "c/b.png", "style": "s/s1.png"}]
    (folders / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plans = plan_pairs(read_manifest(str(folders / "m.jsonl")), StyleParams(), "w", "png")
    assert "line 1" in plans[0].error and message in plans[0].error and plans[0].key == "", plans[0].error
    assert not plans[1].error and not naming_problem(plans[1], "png")
    forged = dataclasses.replace(plans[1], name=output.removesuffix(".png") if output.endswith("png") else output)
    forged = dataclasses.replace(forged, image_key=f"{forged.name}.png", sidecar_key=f"{forged.name}.json")
    assert naming_problem(forged, "png")  # a chunk run given such a plan refuses it too


@pytest.mark.parametrize("output, message", [("../../etc/x", "outside"), ("/abs/x", "not a relative path"),
                                             (True, "must be a file name"), (["a"], "must be a file name"),
                                             (0, "must be a file name")])
def test_a_row_whose_output_would_leave_the_prefix_fails_alone(folders, output, message):
    """One typo or hostile name in a 10,000-row nightly manifest. Old: the whole run was refused at
    preflight, so nothing ran; the rule is that a bad pair fails alone, named, and writes nothing."""
    rows = [{"content": "c/a.jpg", "style": "s/s1.png", "output": output}, {"content": "c/b.png", "style": "s/s1.png"}]
    (folders / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plans = plan_pairs(read_manifest(str(folders / "m.jsonl")), StyleParams(), "w", "png")
    assert "line 1" in plans[0].error and message in plans[0].error and plans[0].key == "", plans[0].error
    assert not plans[1].error


def test_an_output_name_collision_fails_only_the_colliding_pair(folders):
    (folders / "c" / "b.png").write_bytes(to_bytes(pattern((16, 16), seed=3)))  # other bytes than a.jpg
    (folders / "m.csv").write_text("content,style,output\nc/a.jpg,s/s1.png,same\nc/b.png,s/s1.png,same.png\n"
                                   "c/a.jpg,s/s1.png,other\n")
    plans = plan_pairs(read_manifest(str(folders / "m.csv")), StyleParams(), "w", "png")
    assert not plans[0].error and plans[0].name == "same" and not plans[2].error
    assert "output name 'same'" in plans[1].error and "line 2" in plans[1].error
    assert plans[1].name == "same" and plans[1].image_key == "same.png" and not plans[1].runnable


def test_output_names_that_differ_only_in_case_fail_the_second_pair(folders):
    """"Out" and "out" are one file in macOS's and Windows' folders: the second write replaced the
    first pair's image and sidecar, and each night redid both (each found the other's sidecar).
    The same result asked for under two cases is made once, under the first name (a generated
    name's stem keeps its case: A.png and a.png with the same bytes are one result)."""
    (folders / "c" / "b.png").write_bytes(to_bytes(pattern((16, 16), seed=3)))
    (folders / "m.csv").write_text("content,style,output\nc/a.jpg,s/s1.png,sub/Out\nc/b.png,s/s1.png,sub/out\n"
                                   "c/a.jpg,s/s1.png,SUB/OUT\nc/b.png,s/s1.png,other\n")
    plans = plan_pairs(read_manifest(str(folders / "m.csv")), StyleParams(), "w", "png")
    assert not plans[0].error and not plans[3].error
    assert "line 3: output name 'sub/out' differs only in case from 'sub/Out', the output of manifest m.csv line 2" in plans[1].error
    assert not plans[1].runnable
    assert not plans[2].error and plans[2].duplicate_of == 0 and plans[2].image_key == plans[0].image_key
    # where case tells names apart (S3, Linux folders: Storage.folds_case is False) each is its own result
    plans = plan_pairs(read_manifest(str(folders / "m.csv")), StyleParams(), "w", "png", fold_case=False)
    assert all(p.runnable for p in plans) and len({p.image_key for p in plans}) == 4


def test_a_pair_failed_at_planning_keeps_the_output_name_its_row_asked_for(folders):
    """The report item of a row that fails at planning names the output the row asked for, so a
    user can find the row; a pair without its own name had none yet (its name carries its key)."""
    from tasks.contract import failed_item
    from tasks.storage import open_storage

    (folders / "m.csv").write_text("content,style,output\nc/gone.png,s/s1.png,sub/mine.webp\nc/gone.png,s/s1.png,\n")
    plans = plan_pairs(read_manifest(str(folders / "m.csv")), StyleParams(), "w", "png")
    assert all(p.error and not p.runnable and p.key == "" for p in plans)
    out = open_storage(str(folders / "out"))
    assert failed_item(plans[0], plans[0].error, out).output == str(folders / "out" / "sub" / "mine.png")
    assert failed_item(plans[1], plans[1].error, out).output == ""


def test_a_repeated_pair_is_a_duplicate_not_a_failure(folders):
    (folders / "m.csv").write_text("content,style,output\nc/a.jpg,s/s1.png,same\nc/a.jpg,s/s1.png,same\n")
    plans = plan_pairs(read_manifest(str(folders / "m.csv")), StyleParams(), "w", "png")
    assert not plans[1].error and plans[1].duplicate_of == 0 and plans[0].duplicate_of == -1
    assert plans[1].image_key == plans[0].image_key and not plans[1].runnable and plans[0].runnable


def test_same_file_name_in_two_folders(tmp_path):
    """c/2023/IMG_1.png and c/2024/IMG_1.png: other bytes, other names; the same bytes, the same result."""
    for year, seed in (("2023", 1), ("2024", 2)):
        (tmp_path / "c" / year).mkdir(parents=True)
        (tmp_path / "c" / year / "IMG_1.png").write_bytes(to_bytes(pattern((16, 16), seed=seed)))
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "s.png").write_bytes(to_bytes(pattern((16, 16), "style")))
    source = BatchSource(contents=str(tmp_path / "c"), styles=str(tmp_path / "s"))
    plans = plan_pairs(source_entries(source), StyleParams(), "w", "png")
    assert all(p.runnable for p in plans) and plans[0].name != plans[1].name
    (tmp_path / "c" / "2024" / "IMG_1.png").write_bytes((tmp_path / "c" / "2023" / "IMG_1.png").read_bytes())
    plans = plan_pairs(source_entries(source), StyleParams(), "w", "png")
    assert not plans[1].error and plans[1].duplicate_of == 0 and plans[1].name == plans[0].name


def test_s3_prefixes_are_listed_once_and_need_no_other_requests(bucket, monkeypatch):
    from tasks import storage

    name, client = bucket
    for i in range(3):
        client.put_object(Bucket=name, Key=f"c/{i}.png", Body=to_bytes(pattern((16, 16), seed=i)))
    client.put_object(Bucket=name, Key="s/x.png", Body=to_bytes(pattern((16, 16), "style")))
    calls = []
    for method in ("list", "identity", "read"):
        real = getattr(storage.S3Storage, method)
        monkeypatch.setattr(storage.S3Storage, method,
                            lambda self, *a, _real=real, _m=method: calls.append(_m) or _real(self, *a))
    entries = source_entries(BatchSource(contents=f"s3://{name}/c/", styles=f"s3://{name}/s/"))
    plans = plan_pairs(entries, StyleParams(), "w", "jpeg")
    assert calls == ["list", "list"] and len(plans) == 3
    etag = client.head_object(Bucket=name, Key="s/x.png")["ETag"].strip('"')
    assert {p.style_identity for p in plans} == {etag}


def test_listed_keys_that_would_be_read_under_another_key_fail_alone_never_merge(bucket):
    """S3 keys are literal: "c/a//b.png", "c/./d.png", "c/x\\y.png" and "c/a:1.png" are objects of
    their own. Folded to a path ("c/a/b.png"), the first was read as another object: beside a real
    c/a/b.png it became a "duplicate of pair 0, made once" and was never stylized, with no error;
    alone it failed "no such object". Each now fails its pair naming the key as listed."""
    name, client = bucket
    odd = ["c/a//b.png", "c/./d.png", "c/x\\y.png", "c/a:1.png"]
    for i, key in enumerate(["c/a/b.png", *odd]):
        client.put_object(Bucket=name, Key=key, Body=to_bytes(pattern((16, 16), seed=i)))
    client.put_object(Bucket=name, Key="s/x.png", Body=to_bytes(pattern((16, 16), "style")))
    entries = source_entries(BatchSource(contents=f"s3://{name}/c/", styles=f"s3://{name}/s/"))
    plans = plan_pairs(entries, StyleParams(), "w", "jpeg")
    assert len(plans) == 5 and [p.content for p in plans if p.runnable] == [f"s3://{name}/c/a/b.png"], plans
    failed = {p.content.split(f"s3://{name}/", 1)[1]: p.error for p in plans if not p.runnable}
    assert set(failed) == set(odd), failed
    assert all(not p.duplicate_of >= 0 for p in plans)
    assert all(f"{key[2:]!r}" in why and "rename" in why for key, why in failed.items()), failed


def test_an_unidentifiable_input_fails_its_pair_at_planning_with_the_reason(folders):
    (folders / "m.csv").write_text("content,style\nc/a.jpg,s/s1.png\nc/gone.png,s/s1.png\n")
    plans = plan_pairs(read_manifest(str(folders / "m.csv")), StyleParams(), "w", "jpeg")
    assert not plans[0].error and plans[0].key
    assert plans[1].key == "" and "gone.png" in plans[1].error and "no such file" in plans[1].error


def test_identity_lookups_are_retried_when_transient(folders, monkeypatch):
    from tasks import storage
    from tasks.storage import StorageError

    monkeypatch.setattr(storage, "RETRY_DELAYS", (0, 0))
    real, calls = storage.LocalStorage.identity, []

    def flaky(self, key, max_bytes=None):
        calls.append(key)
        if len(calls) == 1:
            raise StorageError("SlowDown", transient=True)
        return real(self, key, max_bytes)

    monkeypatch.setattr(storage.LocalStorage, "identity", flaky)
    (folders / "m.csv").write_text("content,style\nc/a.jpg,s/s1.png\n")
    plans = plan_pairs(read_manifest(str(folders / "m.csv")), StyleParams(), "w", "jpeg", io_workers=1)
    assert not plans[0].error and len(calls) == 3


@pytest.mark.timeout(60)
def test_odd_files_among_the_inputs_fail_their_own_pairs_at_planning_naming_them(folders, monkeypatch):
    """Files named like images that are not readable images, listed or named by a manifest: each
    pair fails at planning with the file's name and why, the others plan. Old code: the 513 MB
    file (sparse) was hashed whole, then read whole by its pair; the FIFO blocked planning for
    ever; the dangling link and the link loop stopped the listing (no plan at all); the folder
    and the socket crashed planning with a bare OSError naming a file descriptor."""
    import hashlib
    import os
    import socket

    from nst_core.imageio import MAX_INPUT_BYTES

    c, too_big = folders / "c", f"{MAX_INPUT_BYTES + 1:,} bytes, over the limit of {MAX_INPUT_BYTES:,}"
    (c / "blobs").mkdir()
    with open(c / "blobs" / "big.bin", "wb") as fh:
        fh.truncate(MAX_INPUT_BYTES + 1)
    os.link(c / "blobs" / "big.bin", c / "huge.png")
    os.symlink(c / "blobs" / "big.bin", c / "huge-link.png")
    os.mkfifo(c / "pipe.png")
    os.symlink(c / "gone.png", c / "dangling.png")
    os.symlink(c / "loop.png", c / "loop.png")
    (c / "folder.png").mkdir()  # a manifest can name it; a listing does not list it
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(c / "socket.png"))
    expected = {
        "huge.png": f"huge.png: {too_big}",
        "huge-link.png": "huge-link.png",  # and its size: listed, or with its target (manifest)
        "pipe.png": "pipe.png: not a regular file",
        "dangling.png": f"dangling.png (a link to {c / 'gone.png'}): no such file",
        "loop.png": "loop.png: cannot resolve",
        "folder.png": "folder.png: is a folder, not a file",
        "socket.png": "socket.png: ",
    }
    hashed, digest = [], hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest",
                        lambda fh, name: hashed.append(os.fstat(fh.fileno()).st_size) or digest(fh, name))
    (folders / "m.csv").write_text("content,style\n" + "".join(f"c/{n},s/s1.png\n" for n in [*expected, "a.jpg"]))
    try:
        for entries in (source_entries(BatchSource(contents=str(c), styles=str(folders / "s"))),
                        read_manifest(str(folders / "m.csv"))):
            errors = {p.content.rsplit("/", 1)[1]: p.error for p in plan_pairs(entries, StyleParams(), "w", "jpeg")}
            assert errors.pop("a.jpg") == "" and errors.pop("b.png", "") == ""
            assert set(errors) == set(expected) - ({"folder.png"} if len(errors) < len(expected) else set())
            for name, error in errors.items():
                assert expected[name] in error, (name, error)
            assert too_big in errors["huge-link.png"]
    finally:
        sock.close()
    assert hashed and max(hashed) < 2**20  # the images only: the huge file never hashed


@pytest.mark.timeout(60)
def test_a_manifest_over_its_byte_limit_is_refused_unread_in_one_line(folders):
    """Old: 256 MB read whole and decoded, then 'line 1: not JSON'."""
    from tasks.plan import MAX_MANIFEST_BYTES

    with open(folders / "m.jsonl", "wb") as fh:
        fh.truncate(MAX_MANIFEST_BYTES + 1)
    with pytest.raises(PreflightError, match=f"m.jsonl: {MAX_MANIFEST_BYTES + 1:,} bytes, over the limit of "
                                             f"{MAX_MANIFEST_BYTES:,} bytes for a manifest"):
        read_manifest(str(folders / "m.jsonl"))


def test_a_manifest_of_local_files_never_lists_their_folders(folders, monkeypatch):
    """A local listing carries no identities (files are hashed), so listing a folder for them is
    waste: old, a manifest naming 9 files of a dataset's root walked its whole tree, then hashed
    each file anyway."""
    from tasks.storage import LocalStorage

    for i in range(9):
        (folders / "c" / f"{i}.png").write_bytes(to_bytes(pattern((16, 16), seed=i)))
    (folders / "m.csv").write_text("content,style\n" + "".join(f"c/{i}.png,s/s1.png\n" for i in range(9)))
    listed = []
    real = LocalStorage.list
    monkeypatch.setattr(LocalStorage, "list", lambda self, prefix="": listed.append(self.uri) or real(self, prefix))
    plans = plan_pairs(read_manifest(str(folders / "m.csv")), StyleParams(), "w", "jpeg")
    assert len(plans) == 9 and not any(p.error for p in plans)
    assert listed == []


def test_a_manifest_lists_an_s3_folder_for_its_own_objects_not_the_tree_below(bucket, monkeypatch):
    """Old: 9 objects named at a bucket's top listed every object of the bucket (one request per
    1000); now one listing of that folder alone (S3's delimiter)."""
    from tasks.storage import S3Storage

    name, client = bucket
    for i in range(9):
        client.put_object(Bucket=name, Key=f"{i}.png", Body=to_bytes(pattern((16, 16), seed=i)))
    for i in range(30):
        client.put_object(Bucket=name, Key=f"deep/{i}.png", Body=b"x")
    client.put_object(Bucket=name, Key="m.csv", Body=("content,style\n" + "".join(
        f"{i}.png,0.png\n" for i in range(9))).encode())
    listed = []
    real = S3Storage.list
    monkeypatch.setattr(S3Storage, "list", lambda self, *a, **k: listed.extend(found := real(self, *a, **k)) or found)
    plans = plan_pairs(read_manifest(f"s3://{name}/m.csv"), StyleParams(), "w", "jpeg")
    assert len(plans) == 9 and not any(p.error for p in plans)
    assert listed and not [o.key for o in listed if "/" in o.key]


def test_an_s3_input_over_the_limit_fails_at_planning_when_its_folder_is_listed_for_a_manifest(bucket, monkeypatch):
    """A manifest naming more than 8 objects of one prefix takes their identities from one listing;
    the sizes in it are checked too (old: planned, then refused only when its pair fetched it)."""
    from tasks import plan

    name, client = bucket
    monkeypatch.setattr(plan, "MAX_INPUT_BYTES", 1000)
    for i in range(9):
        client.put_object(Bucket=name, Key=f"c/{i}.png", Body=b"small")
    client.put_object(Bucket=name, Key="c/big.png", Body=b"x" * 1001)
    client.put_object(Bucket=name, Key="s/x.png", Body=b"style")
    rows = "".join(f"c/{n}.png,s/x.png\n" for n in [*range(9), "big"])
    client.put_object(Bucket=name, Key="m.csv", Body=("content,style\n" + rows).encode())
    errors = {p.content.rsplit("/", 1)[1]: p.error
              for p in plan_pairs(read_manifest(f"s3://{name}/m.csv"), StyleParams(), "w", "jpeg")}
    assert f"s3://{name}/c/big.png: 1,001 bytes, over the limit of 1,000 bytes" in errors.pop("big.png")
    assert set(errors.values()) == {""} and len(errors) == 9


def test_reads_outside_allowed_sources_fail_their_pair(folders, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "secret.png").write_bytes(to_bytes(pattern((16, 16))))
    (folders / "m.jsonl").write_text(
        json.dumps({"content": "c/a.jpg", "style": "s/s1.png"}) + "\n"
        + json.dumps({"content": str(elsewhere / "secret.png"), "style": "s/s1.png"}) + "\n")
    source = BatchSource(manifest=str(folders / "m.jsonl"))
    allowed = default_allowed_sources(source)
    assert allowed == [str(folders)]
    plans = plan_pairs(source_entries(source), StyleParams(), "w", "jpeg", allowed_sources=allowed)
    assert not plans[0].error
    assert "outside allowed_sources" in plans[1].error and plans[1].key == ""


def test_a_folder_link_inside_allowed_sources_does_not_read_outside_them(folders, tmp_path_factory):
    """A link to a folder elsewhere, placed inside an allowed folder, is judged by where it
    leads. Old: the path was compared as spelled, so ``allowed/link/secret.png`` was read."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "secret.png").write_bytes(to_bytes(pattern((16, 16))))
    (folders / "c" / "link").symlink_to(elsewhere, target_is_directory=True)
    (folders / "m.jsonl").write_text(
        json.dumps({"content": "c/a.jpg", "style": "s/s1.png"}) + "\n"
        + json.dumps({"content": "c/link/secret.png", "style": "s/s1.png"}) + "\n")
    source = BatchSource(manifest=str(folders / "m.jsonl"))
    plans = plan_pairs(source_entries(source), StyleParams(), "w", "jpeg",
                       allowed_sources=default_allowed_sources(source))
    assert not plans[0].error
    assert "outside allowed_sources" in plans[1].error and str(elsewhere / "secret.png") in plans[1].error
    assert plans[1].key == ""


def test_an_allowed_folder_reached_through_a_link_still_allows_its_files(folders, tmp_path):
    """The allowed folder itself spelled through a link (a mount point, /data -> /mnt/data)."""
    alias = tmp_path / "alias"
    alias.symlink_to(folders, target_is_directory=True)
    source = BatchSource(contents=str(alias / "c"), styles=str(alias / "s"))
    plans = plan_pairs(source_entries(source), StyleParams(), "w", "jpeg", allowed_sources=[str(folders)])
    assert plans and not any(p.error for p in plans)


def test_a_dotdot_key_under_contents_fails_its_pairs_alone(bucket):
    name, client = bucket
    client.put_object(Bucket=name, Key="c/ok.png", Body=to_bytes(pattern((16, 16))))
    client.put_object(Bucket=name, Key="c/sub/../x.png", Body=to_bytes(pattern((16, 16), seed=1)))
    client.put_object(Bucket=name, Key="s/x.png", Body=to_bytes(pattern((16, 16), "style")))
    entries = source_entries(BatchSource(contents=f"s3://{name}/c/", styles=f"s3://{name}/s/"))
    plans = plan_pairs(entries, StyleParams(), "w", "jpeg")
    assert len(plans) == 2
    bad = [p for p in plans if p.error]
    assert len(bad) == 1 and "sub/../x.png" in bad[0].content and "outside" in bad[0].error


def test_output_file_names_fit_a_file_system_whatever_the_input_names(folders):
    """Derived names join two stems; a file system takes 255 bytes a name. Old: a 130- and a
    120-character stem made a 266-byte image name, and the pair failed at the write, after its
    whole optimization, every night. Names that fit are unchanged (a rerun still finds its results);
    an explicit manifest name too long fails its own pair at planning, naming the row."""
    from tasks.storage import LocalStorage

    long_c, long_s = "c" * 130 + ".png", "s" * 120 + ".png"
    (folders / "c" / long_c).write_bytes(to_bytes(pattern((16, 16))))
    (folders / "s" / long_s).write_bytes(to_bytes(pattern((16, 16), "style")))
    params = StyleParams(weights="random")
    plans = plan_pairs(source_entries(BatchSource(contents=str(folders / "c"), styles=str(folders / "s"))),
                       params, "random(seed=0)", "webp")
    names = {p.name for p in plans}
    assert all(len(f"{n}.webp".encode()) <= 255 and len(f"{n}.json".encode()) <= 255 for n in names), names
    assert len(names) == len(plans) == 6 and not [p.error for p in plans if p.error]
    out = LocalStorage(folders / "out")
    for p in plans:
        out.write(p.image_key, b"x")
        out.write(p.sidecar_key, b"{}")
    assert f"a__s1__{plans[0].key[:8]}" in names  # a name that fits is as before
    assert any(n.startswith("c" * 100) and "s" * 100 in n for n in names)  # shortened, still recognizable

    rows = [{"content": "c/a.jpg", "style": "s/s1.png", "output": "x" * 251},
            {"content": "c/b.png", "style": "s/s1.png", "output": "deep/" + "y" * 250}]
    (folders / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plans = plan_pairs(read_manifest(str(folders / "m.jsonl")), params, "random(seed=0)", "jpeg")
    assert "line 1" in plans[0].error and "251-byte file name" in plans[0].error, plans[0].error
    assert not plans[1].error  # 250 bytes with a folder: fits


def test_a_refusal_shows_a_links_target_only_for_a_link_out_of_an_allowed_folder(tmp_path):
    """Old: every local path whose real path differed got '(it leads to ...)': a run started from
    the UI learnt the worker's layout (/proc/self/cwd/x.png named the working folder)."""
    from tasks.plan import outside_allowed

    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "link").symlink_to(tmp_path, target_is_directory=True)
    refusal = outside_allowed("/proc/self/cwd/x.png", [str(tmp_path / "allowed")])
    assert "outside allowed_sources" in refusal and "leads to" not in refusal
    refusal = outside_allowed(str(tmp_path / "allowed" / "link" / "x.png"), [str(tmp_path / "allowed")])
    assert f"(it leads to {tmp_path / 'x.png'})" in refusal


def test_an_allowed_entry_that_names_no_place_allows_nothing_and_breaks_nothing(tmp_path):
    """Old: a NUL byte in an allowed_sources entry raised out of planning (a traceback, the run's
    report left saying running)."""
    from tasks.plan import outside_allowed

    assert outside_allowed(str(tmp_path / "x.png"), ["/da\x00ta", str(tmp_path)]) == ""
    assert "outside allowed_sources" in outside_allowed(str(tmp_path / "x.png"), ["/da\x00ta"])
    assert "outside allowed_sources" in outside_allowed("/da\x00ta/x.png", [str(tmp_path)])


def test_hidden_files_and_folder_markers_are_not_inputs(folders, bucket):
    """Old: ".hidden.png" and macOS's "._a.jpg" (AppleDouble, on shares) were inputs, failing a pair
    every night, and an S3 folder marker "in/dir.png/" failed its pairs "no such object"."""
    (folders / "c" / ".hidden.png").write_bytes(to_bytes(pattern((16, 16))))
    (folders / "c" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    entries = source_entries(BatchSource(contents=str(folders / "c"), styles=str(folders / "s")))
    assert sorted(e.content.rsplit("/", 1)[1] for e in entries) == ["a.jpg", "b.png"]
    name, client = bucket
    client.put_object(Bucket=name, Key="in/c/a.png", Body=to_bytes(pattern((16, 16))))
    client.put_object(Bucket=name, Key="in/c/dir.png/", Body=b"")
    client.put_object(Bucket=name, Key="in/s/s.png", Body=to_bytes(pattern((16, 16), "style")))
    entries = source_entries(BatchSource(contents=f"s3://{name}/in/c/", styles=f"s3://{name}/in/s/"))
    assert [e.content for e in entries] == [f"s3://{name}/in/c/a.png"]


def test_an_output_that_is_an_input_under_another_spelling_fails_its_pair(folders):
    """On macOS's and Windows' file systems "in/IMG_1.jpg" is the photo "in/IMG_1.JPG": compared as
    strings they differ, and the write replaced the photo. A hard link in the same folder under the
    other case stands in for that second spelling here (Linux file systems tell case apart). A hard
    link under another name is another entry, which the atomic write leaves alone: allowed."""
    import os

    from tasks.plan import refuse_outputs_over_inputs
    from tasks.storage import open_storage

    os.link(folders / "c" / "a.jpg", folders / "c" / "A.jpg")
    os.link(folders / "c" / "a.jpg", folders / "c" / "copy.jpg")
    rows = [{"content": "c/a.jpg", "style": "s/s1.png", "output": "c/A"},
            {"content": "c/a.jpg", "style": "s/s1.png", "output": "c/copy"}]
    (folders / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    plans = plan_pairs(read_manifest(str(folders / "m.jsonl")), StyleParams(), "w", "jpeg")
    checked = refuse_outputs_over_inputs(plans, open_storage(str(folders)))
    assert "would replace an input of this run" in checked[0].error and "a.jpg" in checked[0].error, checked[0]
    assert not checked[1].error, checked[1]
