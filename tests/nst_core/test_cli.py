import json
import subprocess
import sys

import pytest

from helpers import pattern

pytestmark = pytest.mark.e2e


def nst(*args, cwd):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def files(tmp_path):
    pattern((48, 40), "content").save(tmp_path / "content.jpg")
    pattern((40, 48), "style").save(tmp_path / "style.png")
    pattern((40, 40), "rings").save(tmp_path / "style2.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return tmp_path


def test_stylize_writes_image_and_sidecar(files):
    proc = nst("stylize", "content.jpg", "style.png", "style2.png", "-o", "out/result.webp", "--weights", "random",
               "--image-size", "32", "--iterations", "4", "--style-blend-weights", "2", "1", "--device", "cpu",
               cwd=files)
    assert proc.returncode == 0, proc.stderr
    assert (files / "out/result.webp").read_bytes()[8:12] == b"WEBP"
    meta = json.loads((files / "out/result.webp.json").read_text())
    assert meta["params"]["iterations"] == 4 and meta["params"]["style_blend_weights"] == [2.0, 1.0]
    assert meta["params"]["style_weight"] == 1e-3  # the model's default, not restated by the CLI
    assert meta["evaluations"] == 4 and meta["losses"]["final"]["total"] <= meta["losses"]["initial"]["total"]
    assert meta["styles"] == ["style.png", "style2.png"] and "versions" in meta and "seconds" in meta
    assert "4/4" in proc.stderr  # the progress bar reached the end
    # not a terminal (a log file, cron's mail): whole lines, no carriage returns (old: "\r[###...]" redraws)
    # (text mode reads each "\r" as a line end: the bar's redraws showed as padded "[####---]" lines)
    assert "[#" not in proc.stderr and "-----" not in proc.stderr and "   \n" not in proc.stderr, repr(proc.stderr)


@pytest.mark.parametrize("args,message", [
    (["broken.png", "style.png", "-o", "o.png"], "broken.png: corrupt or truncated"),
    (["missing.png", "style.png", "-o", "o.png"], "missing.png: cannot read"),
    (["content.jpg", "style.png", "-o", "o.gif"], "unsupported output extension .gif"),
    (["content.jpg", "style.png", "-o", "o.png", "--iterations", "0"], "iterations: Input should be greater"),
    (["content.jpg", "style.png", "-o", "o.png", "--style-layers", "relu9_9"], "valid names are: conv1_1"),
    (["content.jpg", "style.png", "-o", "o.png", "--optimizer", "sgd"], "invalid choice: 'sgd'"),
    (["content.jpg", "style.png", "-o", "content.jpg/o.png"], "content.jpg: cannot write"),  # was a traceback
    (["content.jpg", "style.png", "-o", "o.png", "--image-size", "16"], "content.jpg: 16x13 px is too small"),
    (["huge.png", "style.png", "-o", "o.png"], "huge.png: over the limit of 513,048,576 bytes for an input image"),
])
def test_bad_input_exits_2_with_one_line(files, args, message):
    if args[0] == "huge.png":  # sparse: no disk; read whole, it was "not a recognized image format" after 600 MB
        with open(files / "huge.png", "wb") as f:
            f.truncate(600 * 2**20)
    proc = nst("stylize", *args, "--weights", "random", cwd=files)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (files / "o.png").exists()


@pytest.mark.parametrize("args,message", [
    (["missing.png", "style.png", "--weights", "random"], "missing.png: cannot read"),
    (["content.jpg", "style.png", "--weights", "random", "--image-size", "16"], "content.jpg: 16x13 px is too small"),
    (["content.jpg", "style.png", "--weights", "nope.pth"], "weights file nope.pth does not exist"),
    # old: refused by the engine, after torch loaded (5 s)
    (["content.jpg", "style.png", "--weights", "random", "--style-blend-weights", "1", "2"],
     "style_blend_weights has 2 values for 1 style image(s)"),
])
def test_an_input_error_answers_before_the_engine_loads(files, args, message):
    _answers_before_the_engine_loads(files, [*args, "-o", "o.png"], message)


@pytest.mark.parametrize("args,message", [
    # Old: the content photo was replaced by the result (exit 0); a folder named like an image, or a
    # folder that takes no file, failed "cannot write" after the whole optimization.
    (["content.jpg", "style.png", "-o", "content.jpg"], "-o content.jpg is the input image content.jpg"),
    (["content.jpg", "style.png", "-o", "./style.png"], "is the input image style.png"),
    (["content.jpg", "style.png", "-o", "folder.png"], "folder.png: is a folder"),
])
def test_an_output_that_cannot_be_written_as_asked_is_refused_before_the_engine_loads(files, args, message):
    (files / "folder.png").mkdir()
    before = (files / "content.jpg").read_bytes(), (files / "style.png").read_bytes()
    _answers_before_the_engine_loads(files, [*args, "--weights", "random"], message)
    assert ((files / "content.jpg").read_bytes(), (files / "style.png").read_bytes()) == before
def _answers_before_the_engine_loads(files, args, message):
    # torch takes ~3 s to import (6.6 s for a misspelt file name before, with torchvision); every
    # check that needs no torch (files, sizes, weights path, format, parameters, the output folder)
    # comes first.
    code = (f"import sys; from flows.cli import main; rc = main(['stylize', *{args!r}]); "
            "print(rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=files, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
    assert message in proc.stderr


def test_the_size_checks_before_torch_are_the_engines():
    """Content at image_size against every layer, a style against the style layers only; a side
    of exactly min_side passes (the engine's _prepare and style targets decide the same)."""
    from nst_core.cli import _check_sizes
    from nst_core.errors import ImageTooSmallError
    from nst_core.params import StyleParams

    deep = StyleParams(weights="random", image_size=64)  # relu5_1: 16 px
    content, thin = ("c.png", pattern((64, 48))), ("thin.png", pattern((64, 15), "style"))
    with pytest.raises(ImageTooSmallError, match=r"thin.png: 64x15 px is too small.* at least 16 px"):
        _check_sizes(deep, content, ("ok.png", pattern((64, 64))), thin)
    _check_sizes(deep, content, ("edge.png", pattern((64, 16), "style")))  # exactly 16 px
    shallow = StyleParams(weights="random", image_size=64, style_layers=["relu1_1", "relu2_1"])  # 2 px
    _check_sizes(shallow, content, thin)  # the deep content layer does not refuse a thin style
    with pytest.raises(ImageTooSmallError, match=r"c.png: 64x7 px.* at least 8 px"):
        _check_sizes(shallow, ("c.png", pattern((64, 7))), thin)  # the content: relu4_2 needs 8 px


def test_unknown_layer_message_lists_every_valid_name(files):
    from nst_core import VGG16_LAYERS

    proc = nst("stylize", "content.jpg", "style.png", "-o", "o.png", "--weights", "random",
               "--content-layers", "relu9_9", cwd=files)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    listed = proc.stderr.split("valid names are: ", 1)[1].strip().split(", ")
    assert listed == list(VGG16_LAYERS)


def test_missing_weights_file_exits_2(files):
    proc = nst("stylize", "content.jpg", "style.png", "-o", "o.png", "--weights", "nope.pth", cwd=files)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("nst: error: weights file nope.pth does not exist (weights are "), proc.stderr


def test_progress_bar_ends_full_after_an_early_stop(files):
    proc = nst("stylize", "content.jpg", "style.png", "-o", "o.png", "--weights", "random", "--device", "cpu",
               "--image-size", "32", "--iterations", "200", "--scales", "1", "--stop-tolerance", "0.9", cwd=files)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((files / "o.png.json").read_text())
    assert meta["evaluations"] < 200 and f"{meta['evaluations']}/{meta['evaluations']}" in proc.stderr


def test_auto_or_number_options_parse_and_help_prints():
    """tile_size is ``auto | off | N``: argparse took the union's first member (a choice of
    auto/off) and refused 384; a '%' in a description crashed --help."""
    import argparse

    from nst_core import StyleParams
    from nst_core.cli import add_model_options, model_from_args

    parser = argparse.ArgumentParser()
    add_model_options(parser, StyleParams)
    assert "auto|off|INT" in parser.format_help()
    # an unset default says so, as the README's table does (was "(default: None)")
    assert "(default: None)" not in " ".join(parser.format_help().split())
    params = lambda *a: model_from_args(StyleParams, parser.parse_args(list(a)))  # noqa: E731
    assert params("--tile-size", "384", "--max-memory-gb", "2.5").tile_size == 384
    assert params("--tile-size", "off").tile_size == "off" and params().tile_size == "auto"
    with pytest.raises(ValueError, match="at least 64"):
        params("--tile-size", "32")


def test_an_endpoint_with_credentials_never_reaches_an_error_line_and_keys_keep_their_at_signs(files):
    """Old: `nst stylize --weights s3://...` with AWS_ENDPOINT_URL_S3=http://user:secretpw@host printed
    botocore's "Could not connect to the endpoint URL: "http://user:secretpw@..."" as its error line;
    in a flow the same message reached the log, the report and the UI."""
    import os

    from nst_core import NSTError

    env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_ENDPOINT_URL_S3": "http://user:secretpw@127.0.0.1:9"}  # port 9: nothing listens
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "stylize", "content.jpg", "style.png", "-o", "o.png",
                           "--weights", "s3://bucket/vgg.pth", "--image-size", "32", "--device", "cpu"],
                          cwd=files, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "could not read weights s3://bucket/vgg.pth" in proc.stderr, proc.stderr
    assert "secretpw" not in proc.stderr + proc.stdout and "http://127.0.0.1:9/bucket/vgg.pth" in proc.stderr
    # every error of ours: an endpoint's password goes, an S3 key's '@' stays
    shown = str(NSTError('s3://b/IMG@2x.png: "HTTPS://u:p@ss@host/x" failed'))
    assert shown == 's3://b/IMG@2x.png: "HTTPS://host/x" failed', shown


@pytest.mark.parametrize("text, secret", [
    ("the Prefect API at http://admin:pa/ss@host:4200/api does not answer", "pa/ss"),
    ("at http://admin:p@ss@host:4200/api (refused)", "p@ss"),
    ("postgresql+asyncpg://prefect:s3cret@db:5432/prefect", "s3cret"),
    # botocore's words for an endpoint it cannot parse (~/.aws/config's, no scheme or one slash)
    ("s3://b/in/: ValueError: Invalid endpoint: minio:s3cret@db:5432/prefect", "s3cret"),
    ("s3://b/in/: ValueError: Invalid endpoint: https:/minio:s3cret@db:5432/prefect", "s3cret"),
])
def test_credentials_in_a_url_never_reach_an_error_line(text, secret):
    """Old: a password holding '/' or '@' (valid to SQLAlchemy and httpx) was kept whole or in part."""
    from nst_core.cli import without_userinfo

    shown = without_userinfo(text)
    assert secret not in shown and "ss@" not in shown, shown
    assert "host:4200/api" in shown or "db:5432/prefect" in shown, shown


def test_pipe_safe_streams_keep_a_closed_stream_closed_and_copy(monkeypatch):
    """`nst ... >&-` starts with sys.stdout None: print() writes nothing there, and wrapping it made
    every print an AttributeError; a wrapped stream must copy (copy.copy recursed)."""
    import copy
    import io

    from nst_core.cli import PipeSafe, pipe_safe_streams

    monkeypatch.setattr(sys, "stdout", None)
    with pipe_safe_streams():
        assert sys.stdout is None
        print("nowhere")
    assert copy.copy(PipeSafe(io.StringIO())) is not None


def test_outputs_are_written_whole_under_any_name_and_through_a_link(tmp_path):
    """The temporary file was named after the output (.{name}.{pid}.tmp): a 245-character name,
    valid before, failed after the optimization; an output that is a link was replaced by a file."""
    from nst_core.cli import _write

    long = tmp_path / ("x" * 245 + ".png")
    _write(long, b"image")
    assert long.read_bytes() == b"image"
    (tmp_path / "real.png").write_bytes(b"old")
    (tmp_path / "link.png").symlink_to("real.png")
    _write(tmp_path / "link.png", b"new")
    assert (tmp_path / "link.png").is_symlink() and (tmp_path / "real.png").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([long.name, "real.png", "link.png"])  # no temp left


def test_the_progress_bar_fits_its_terminal_so_each_redraw_replaces_the_last(monkeypatch):
    """Each redraw was padded to 100 columns: on an 80-column terminal it wrapped, "\\r" went back to
    the wrapped part only, and every redraw left a line (300 lines for a default stylize). Now a
    line fits the terminal and is padded only over what the one before it showed."""
    import io
    import os as os_

    from nst_core.cli import ProgressBar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=(80, 24): os_.terminal_size((80, 24)))
    stream = Terminal()
    bar = ProgressBar(300, "stylize ", stream=stream)
    for done in (1, 150, 300):
        bar._last = -1.0  # not throttled
        bar.update(done, f"loss {1.0 / done:.4g} at scale 2/3 (181x136) and a long note to wrap it" * 2)
    redraws = stream.getvalue().rstrip("\n").split("\r")[1:]
    assert len(redraws) == 3 and all(len(r) < 80 for r in redraws), [len(r) for r in redraws]
    assert "300/300" in redraws[-1]
