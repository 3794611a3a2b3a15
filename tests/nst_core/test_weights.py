"""Weight sources: hub checkpoints verified before unpickling, one-line refusals, key prefixes, caching."""

import contextlib
import os
import hashlib
import threading
import time

import pytest
import torch

from nst_core import WeightsError
from nst_core import vgg as vgg_mod
from nst_core import weights as weights_mod
from nst_core.vgg import load_extractor

FEATURES_FILE = "vgg16_features-amdegroot-88682ab5.pth"  # torchvision's name for imagenet1k_features


@pytest.fixture(autouse=True)
def fresh_cache():
    vgg_mod.clear_cache()
    yield
    vgg_mod.clear_cache()


class _WritesMarker:
    """Unpickling this creates ``path``: stands in for arbitrary code in a planted checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _random_features(seed=3):
    return load_extractor("random", layers=["relu5_3"], seed=seed).layers.state_dict()


def _hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


def _no_network(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(weights_mod, "_download", offline)


@contextlib.contextmanager
def _http(files=None, silent=False):
    """An HTTP server on 127.0.0.1 serving ``files`` {name: bytes}, or (``silent``) one that accepts
    connections and never answers; stopped on exit. Yields its base URL."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if silent:
                release.wait(30)
                return
            body = (files or {}).get(self.path.lstrip("/"))
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def _named_at(monkeypatch, url):
    named = weights_mod._named_weights()["imagenet1k_v1"]
    monkeypatch.setitem(weights_mod._named_weights(), "imagenet1k_v1", named._replace(url=url))


def test_the_literal_normalizations_are_the_enums():
    # random and bare state_dict weights use literals, so they never import torchvision (~2.5 s)
    named = weights_mod._named_weights()
    assert weights_mod._CAFFE_MEAN_STD == (named["imagenet1k_features"].mean, named["imagenet1k_features"].std)
    assert weights_mod._IMAGENET_MEAN_STD == (named["imagenet1k_v1"].mean, named["imagenet1k_v1"].std)


def test_planted_pickle_in_the_hub_cache_is_never_unpickled(tmp_path, monkeypatch):
    checkpoints = _hub(tmp_path, monkeypatch)
    _no_network(monkeypatch)
    marker = tmp_path / "code-ran"
    planted = checkpoints / FEATURES_FILE
    torch.save({"features.0.weight": _WritesMarker(marker)}, planted)
    # Hash check against the file name's prefix (88682ab5) refuses it before any unpickling.
    with pytest.raises(Exception) as err:
        load_extractor("imagenet1k_features", layers=["relu1_1"])
    assert not marker.exists(), "the planted pickle was unpickled and ran its code"
    assert isinstance(err.value, WeightsError) and "sha256" in str(err.value) and "88682ab5" in str(err.value)
    # Even when the hash is pinned to the planted file itself, weights_only=True refuses the code.
    digest = hashlib.sha256(planted.read_bytes()).hexdigest()
    with pytest.raises(Exception) as err:
        load_extractor("imagenet1k_features", layers=["relu1_1"], sha256=digest)
    assert not marker.exists(), "the planted pickle was unpickled and ran its code"
    msg = str(err.value)
    assert isinstance(err.value, WeightsError) and "holds pickled Python objects" in msg
    assert "\n" not in msg and "will likely succeed" not in msg


def test_hub_checkpoint_whose_name_prefix_matches_its_hash_loads(tmp_path, monkeypatch):
    checkpoints = _hub(tmp_path, monkeypatch)
    _no_network(monkeypatch)
    features = _random_features()
    staging = tmp_path / "staging.pth"
    torch.save({f"features.{k}": v for k, v in features.items()}, staging)
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()
    name = f"vgg16-{digest[:8]}.pth"
    staging.rename(checkpoints / name)
    named = weights_mod._named_weights()["imagenet1k_v1"]
    monkeypatch.setitem(weights_mod._named_weights(), "imagenet1k_v1", named._replace(url=f"https://example.invalid/{name}"))
    ex = load_extractor("imagenet1k_v1", layers=["relu2_1"])
    assert torch.equal(ex.layers[2].weight, features["2.weight"])
    assert ex.weights_id == f"torchvision:{name}"
    assert ex.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    # A pinned hash is checked against the cached file too.
    with pytest.raises(WeightsError, match="expected 1111"):
        load_extractor("imagenet1k_v1", layers=["relu3_1"], sha256="1" * 64)


def test_missing_hub_checkpoint_is_downloaded_and_its_hash_prefix_checked(tmp_path, monkeypatch):
    checkpoints = _hub(tmp_path, monkeypatch)
    features = _random_features()
    staging = tmp_path / "staging.pth"
    torch.save({f"features.{k}": v for k, v in features.items()}, staging)
    data = staging.read_bytes()
    name = f"vgg16-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    with _http({name: data, "vgg16-00000000.pth": data}) as url:
        _named_at(monkeypatch, f"{url}/{name}")
        ex = load_extractor("imagenet1k_v1", layers=["relu1_1"])
        assert (checkpoints / name).read_bytes() == data and torch.equal(ex.layers[0].weight, features["0.weight"])
        # bytes whose hash does not match the file name's prefix are refused and never kept
        vgg_mod.clear_cache()
        _named_at(monkeypatch, f"{url}/vgg16-00000000.pth")
        with pytest.raises(WeightsError, match="SHA-256 .* does not start with 00000000"):
            load_extractor("imagenet1k_v1", layers=["relu1_1"])
    assert sorted(p.name for p in checkpoints.iterdir()) == [name]  # no partial or temporary file left


def test_a_downloaded_checkpoint_is_as_readable_as_the_umask_allows(tmp_path, monkeypatch):
    """A hub cache shared by users (one TORCH_HOME on a GPU box): mkstemp made the checkpoint 0600, so
    only the user who downloaded it could read it, and everyone else's run failed on it for good."""
    import stat

    checkpoints = _hub(tmp_path, monkeypatch)
    staging = tmp_path / "staging.pth"
    torch.save(_random_features(), staging)
    data = staging.read_bytes()
    name = f"vgg16-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    previous = os.umask(0o022)
    try:
        with _http({name: data}) as url:
            _named_at(monkeypatch, f"{url}/{name}")
            load_extractor("imagenet1k_v1", layers=["relu1_1"])
    finally:
        os.umask(previous)
    assert stat.S_IMODE((checkpoints / name).stat().st_mode) == 0o644


def test_a_weights_file_that_cannot_be_read_is_one_weights_error(tmp_path, monkeypatch):
    path = tmp_path / "vgg.pth"
    torch.save(_random_features(), path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(weights_mod, "open", denied, raising=False)
    with pytest.raises(WeightsError, match=r"weights file .*vgg.pth cannot be read: Permission denied"):
        load_extractor(str(path), layers=["relu1_1"])


def test_a_download_that_never_answers_fails_in_bounded_time(tmp_path, monkeypatch):
    """Old: torch.hub's urlopen had no timeout, so a first run behind a stalled proxy or a firewall
    that drops packets hung before its first line, for ever."""
    checkpoints = _hub(tmp_path, monkeypatch)
    monkeypatch.setattr(weights_mod, "DOWNLOAD_TIMEOUT_S", 1, raising=False)
    outcome = []

    def load():
        try:
            load_extractor("imagenet1k_v1", layers=["relu1_1"])
        except WeightsError as err:
            outcome.append(str(err))

    with _http(silent=True) as url:
        _named_at(monkeypatch, f"{url}/vgg16-397923af.pth")
        started = time.monotonic()
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        worker.join(20)
        assert not worker.is_alive(), "the download still hangs after 20 s"
    assert time.monotonic() - started < 20 and len(outcome) == 1
    assert "timed out" in outcome[0] and "vgg16-397923af.pth" in outcome[0] and "\n" not in outcome[0]
    assert list(checkpoints.iterdir()) == []


def test_unavailable_named_weights_say_how_to_supply_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _no_network(monkeypatch)
    with pytest.raises(WeightsError) as err:
        load_extractor("imagenet1k_features", layers=["relu1_1"])
    msg = str(err.value)
    assert FEATURES_FILE in msg and "checkpoints" in msg and "random" in msg and "unreachable" in msg
    assert "--weights" in msg and "weights=PATH" not in msg  # the CLI's spelling, not a keyword argument's


def test_refused_file_gives_one_line_without_torch_advice(tmp_path):
    bad = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), bad)  # a pickled module: weights_only=True refuses it
    with pytest.raises(WeightsError) as err:
        load_extractor(str(bad), layers=["relu1_1"])
    msg = str(err.value)
    assert "\n" not in msg and "weights_only=False" not in msg and "will likely succeed" not in msg
    assert str(bad) in msg and "Linear" in msg  # still says what was refused
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError) as err:
        load_extractor(str(junk), layers=["relu1_1"])
    assert "\n" not in str(err.value) and str(junk) in str(err.value)


@pytest.mark.parametrize("prefix", ["module.", "module.features.", "model.", "model.features.", "features."])
def test_common_key_prefixes_are_stripped(tmp_path, prefix):
    features = _random_features()
    path = tmp_path / "vgg.pth"
    torch.save({f"{prefix}{k}": v for k, v in features.items()}, path)
    ex = load_extractor(str(path), layers=["relu5_3"])
    assert all(torch.equal(a, b) for a, b in zip(ex.layers.state_dict().values(), features.values()))


def test_foreign_keys_are_refused_with_an_example_and_the_expected_form(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.zeros(64)}, path)
    with pytest.raises(WeightsError) as err:
        load_extractor(str(path), layers=["relu1_1"])
    msg = str(err.value)
    assert "conv1.weight" in msg and "features.N.weight" in msg and "N.weight" in msg and str(path) in msg


def test_file_sha256_is_streamed_in_chunks(tmp_path, monkeypatch):
    path = tmp_path / "vgg.pth"
    torch.save(_random_features(), path)
    size = path.stat().st_size
    monkeypatch.setattr(weights_mod, "_CHUNK", 1 << 16)
    reads = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(weights_mod, "open", lambda p, mode="r": Spy(real_open(p, mode)), raising=False)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_extractor(str(path), layers=["relu1_1"], sha256=digest).weights_id == f"sha256:{digest}"
    assert reads and all(0 < n <= 1 << 16 for n in reads) and len(reads) >= size // (1 << 16)


def test_opened_weights_are_read_once_per_process(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save(_random_features(), path)
    seen = []

    def opener(uri):
        seen.append(uri)
        return path.read_bytes()

    for layers, dtype in ((["relu1_1"], torch.float32), (["relu5_1"], torch.float32), (["relu2_1"], torch.float64)):
        load_extractor("s3://bucket/vgg.pth", layers=layers, dtype=dtype, opener=opener)
    load_extractor("s3://bucket/vgg.pth", layers=["relu3_1"], pooling="avg", opener=opener)
    assert seen == ["s3://bucket/vgg.pth"]


def test_a_weights_file_uri_with_a_host_is_refused(tmp_path, monkeypatch):
    """file://models/vgg.pth was /vgg.pth (the host dropped); now refused, naming the URI."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match="a file URI with a host \\('models'\\)"):
        weights_mod.check_weights_file("file://models/vgg.pth")

@pytest.mark.parametrize("name", ["vgg #2.pth", "vgg?v=2.pth"])
def test_a_weights_file_whose_name_holds_a_hash_or_a_question_mark_loads_from_a_file_uri(tmp_path, name):
    """'#' and '?' are part of a file name, as the batch's storage reads them (old: urlparse read
    file:///…/vgg #2.pth as '/…/vgg ' and refused a file that is there)."""
    path = tmp_path / name
    torch.save(_random_features(), path)
    for uri in (f"file://{path}", str(path)):
        assert load_extractor(uri, layers=["relu1_1"]).weights_id.startswith("sha256:")


def test_a_weights_file_uri_as_pathlib_writes_it_loads(tmp_path):
    """Old: Path.as_uri()'s %20 for a space was taken literally: "file:///…/v%20g%20g.pth does not exist"."""
    path = tmp_path / "with space" / "v g g.pth"
    path.parent.mkdir()
    torch.save(_random_features(), path)
    assert "%20" in path.as_uri()
    assert load_extractor(path.as_uri(), layers=["relu1_1"]).weights_id.startswith("sha256:")


@pytest.mark.parametrize("extra,message", [
    ({"mean": torch.tensor(0.5), "std": torch.tensor(0.2)}, "'mean' must be 3 finite numbers"),  # TypeError before
    ({"mean": [0.5], "std": [0.2]}, "'mean' must be 3 finite numbers"),  # RuntimeError (view) before
    ({"mean": [0.5] * 3, "std": [0.0] * 3}, "'std' must be 3 finite numbers"),  # loaded: NaN features before
    # one without the other was dropped, and ImageNet's pair used: a Caffe-style mean-only file 58x off
    ({"mean": [0.5] * 3}, "'mean' without 'std'"),
    ({"std": [0.2] * 3}, "'std' without 'mean'"),
])
def test_bad_mean_or_std_is_one_weights_error(tmp_path, extra, message):
    path = tmp_path / "vgg.pth"
    torch.save({"state_dict": _random_features(), **extra}, path)
    with pytest.raises(WeightsError, match=message):
        load_extractor(str(path), layers=["relu1_1"])


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_weights_that_are_not_real_numbers_are_refused_at_load(tmp_path, dtype):
    """Old: loaded, integers and booleans cast, a complex value's imaginary part dropped."""
    features = _random_features()
    features["2.weight"] = features["2.weight"].to(dtype)
    path = tmp_path / "vgg.pth"
    torch.save(features, path)
    with pytest.raises(WeightsError, match=rf"'2.weight' holds {str(dtype).removeprefix('torch.')}, not floating point"):
        load_extractor(str(path), layers=["relu1_1"])


def test_two_keys_for_one_layer_are_refused(tmp_path):
    """"features.0.weight" and "module.features.0.weight": whichever came last was used, silently."""
    features = _random_features()
    path = tmp_path / "vgg.pth"
    torch.save({**{f"features.{k}": v for k, v in features.items()}, "module.features.0.weight": features["0.weight"] * 0},
               path)
    with pytest.raises(WeightsError, match=r"'module.features.0.weight' and 'features.0.weight' are both layer 0.weight"):
        load_extractor(str(path), layers=["relu1_1"])


def test_a_folder_given_as_the_weights_file_is_called_a_folder(tmp_path):
    with pytest.raises(WeightsError, match="is a folder, not a weights file"):
        load_extractor(str(tmp_path), layers=["relu1_1"])


def test_non_finite_weights_are_refused_at_load(tmp_path):
    features = _random_features()
    features["2.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "vgg.pth"
    torch.save(features, path)
    with pytest.raises(WeightsError, match="'2.weight' holds NaN"):
        load_extractor(str(path), layers=["relu1_1"])


def test_the_bytes_loaded_are_the_bytes_hashed(tmp_path, monkeypatch):
    # The file was hashed, then opened again by torch.load: a file swapped in between was loaded
    # unverified. Now torch.load gets the very bytes whose digest was checked.
    path = tmp_path / "vgg.pth"
    torch.save(_random_features(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    seen = []
    real = torch.load

    def spy(source, *a, **k):
        seen.append(hashlib.sha256(source.getvalue()).hexdigest() if hasattr(source, "getvalue") else str(source))
        return real(source, *a, **k)

    monkeypatch.setattr(torch, "load", spy)
    load_extractor(str(path), layers=["relu1_1"], sha256=digest)
    assert seen == [digest]


def test_a_refusal_says_what_and_why_in_our_words_and_no_torch_warning_escapes(tmp_path, recwarn):
    import warnings

    warnings.simplefilter("always")
    bad = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), bad)
    with pytest.raises(WeightsError) as err:
        load_extractor(str(bad), layers=["relu1_1"])
    msg = str(err.value)
    assert "torch.nn.modules.linear.Linear" in msg and "could run code" in msg
    assert "weights_only" not in msg and "succeed" not in msg and "Please" not in msg
    good = tmp_path / "vgg.pth"
    torch.save(_random_features(), good)
    load_extractor(str(good), layers=["relu1_1"])
    assert not [w for w in recwarn if issubclass(w.category, UserWarning) and "torch" in str(w.filename)]


@pytest.mark.parametrize("name,data,reason", [
    ("vgg.safetensors", (64).to_bytes(8, "little") + b'{"features.0.weight":{"dtype":"F32"}}' + bytes(64),
     "a safetensors file"),
    ("noise.pth", bytes(range(256)) * 16, "not a PyTorch checkpoint"),
    ("notes.pth", b"hello\n", "not a PyTorch checkpoint"),
])
def test_a_file_that_is_no_checkpoint_is_not_called_unsafe(tmp_path, name, data, reason):
    """Old: random bytes read "refused: the file holds pickled Python objects ... could run code"
    (a safetensors VGG was called malicious) and a text file "not a loadable state_dict file (101)"."""
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(WeightsError) as err:
        load_extractor(str(path), layers=["relu1_1"])
    msg = str(err.value)
    assert reason in msg and str(path) in msg and "could run code" not in msg and "(101)" not in msg, msg


def test_a_weights_file_replaced_in_place_is_read_again(tmp_path):
    """Old: load_weights saw the new file (its cache is keyed by mtime and size) but load_extractor
    cached by the spelling alone and kept the old tensors and id: in one process (a notebook, a
    library caller) the new weights were ignored, and output keys built from the old id."""
    path = tmp_path / "vgg.pth"
    torch.save(_random_features(seed=3), path)
    first = load_extractor(str(path), layers=["relu1_1"])
    torch.save(_random_features(seed=4), path)
    os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns + 1_000_000_000))  # a coarse clock: a new mtime
    second = load_extractor(str(path), layers=["relu1_1"])
    assert second.weights_id != first.weights_id
    assert torch.equal(second.layers[0].weight, _random_features(seed=4)["0.weight"])
    assert load_extractor(str(path), layers=["relu1_1"]) is second  # unchanged: still cached
