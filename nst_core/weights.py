"""VGG16 weights: where they come from, how they are verified, how they are read.

Weights files are never trusted: named torchvision weights are found in (or downloaded to) the
torch hub cache and their SHA-256 is checked (pinned, else the prefix in torchvision's file
name) before anything is unpickled; every source is loaded with ``weights_only=True``, from the
very bytes that were hashed (a file swapped after the check is never the one loaded).
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import pickle
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

from .errors import WeightsError
from .params import NAMED_WEIGHTS
from .uris import absolute_local, host_problem, parse_uri

# torch (~3 s to import) loads inside the functions that read or fetch weights: the CLI checks a
# weights path before the engine loads (check_weights_file).

__all__ = ["Opener", "HOW_TO_SUPPLY_WEIGHTS", "LoadedWeights", "load_weights", "weights_key", "read_weights_bytes",
           "check_weights_file", "clear_weights", "portable_weights"]


class _Named(NamedTuple):
    """A named torchvision checkpoint: where it downloads from and the normalization it was trained with."""

    url: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


#: torchvision's VGG16_Weights members by the names ``weights`` takes (the Caffe port: 0-255 inputs, mean only).
_NAMES = {name: name.upper() for name in NAMED_WEIGHTS}  # -> torchvision's VGG16_Weights member


@functools.cache
def _named_weights() -> dict[str, _Named]:
    """Each named checkpoint's URL and normalization, from torchvision's enum (read on first use:
    importing torchvision takes ~2.5 s, which random and file weights need not pay)."""
    from torchvision.models import VGG16_Weights

    def named(enum) -> _Named:
        transforms = enum.transforms()  # a small transform object; nothing is downloaded
        return _Named(enum.url, tuple(transforms.mean), tuple(transforms.std))

    return {name: named(VGG16_Weights[member]) for name, member in _NAMES.items()}


# The two normalizations as the enum states them (tests/nst_core/test_weights.py checks), as
# literals for the weights that need no enum. A bare state_dict gets ImageNet's; random weights
# see the default weights' input scale (0-255, mean removed), so the default α/β strike a
# comparable balance and the losses are large enough for L-BFGS's curvature test.
_IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CAFFE_MEAN_STD = ((0.48235, 0.45882, 0.40784), (1 / 255, 1 / 255, 1 / 255))
#: torchvision (and torch.hub) put the first hex digits of a checkpoint's SHA-256 in its file name.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")
#: Bytes read at a time when hashing a weights file (never the whole file in memory).
_CHUNK = 1 << 20
#: What a key of a VGG16 features state_dict looks like once prefixes are stripped.
_FEATURE_KEY = re.compile(r"\d+\.(weight|bias)")
_WRAPPER_PREFIXES = ("module.", "model.")  # DataParallel / Lightning-style wrappers

HOW_TO_SUPPLY_WEIGHTS = (
    "copy {file} into {hub}/checkpoints/ (TORCH_HOME), or set weights (--weights on the command line, "
    "params.weights in a flow) to a path, file:// or s3:// URI of a VGG16 state_dict, or to 'random' for a smoke run"
)

Opener = Callable[[str], bytes]

def _read_hashed(path: Path) -> tuple[bytes, str]:
    """A file's bytes and their SHA-256, read once in ``_CHUNK``-sized pieces: what is loaded
    afterwards is exactly what was hashed."""
    digest, parts = hashlib.sha256(), []
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                parts.append(chunk)
    except OSError as err:  # another user's file in a shared cache, a mount gone: one line, not a traceback
        raise WeightsError(f"weights file {path} cannot be read: {err.strerror or err}") from None
    return b"".join(parts), digest.hexdigest()


def _one_line(err: BaseException) -> str:
    """The first line of an exception's message, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    return next((part.strip() for part in text.splitlines() if part.strip()), type(err).__name__)


def _refused_global(err: BaseException) -> str:
    """What a weights_only load refused, in our words: the pickled global it met, if named.

    torch's own text advises that re-running with weights_only=False "will likely succeed":
    advice to switch off the very check that stopped the file, so it is never relayed.
    """
    match = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"global:? ([\w.]+)", str(err), re.I)
    return match.group(1) if match else ""


def _local_path(uri: str) -> Path | None:
    scheme, _, path = parse_uri(uri)  # '#' and '?' are part of a file name, as in the batch's storage
    if why := host_problem(uri):
        raise WeightsError(why)
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        return Path(path).expanduser()
    return None


def _path_of(weights: str) -> Path | None:
    """The local file ``weights`` names, or None (random, named or remote weights)."""
    return None if weights == "random" or weights in _NAMES else _local_path(weights)


def portable_weights(weights: str) -> str:
    """``weights`` as another process in another working folder (a chunk run's worker) reads them:
    a local file's path made absolute, anything else as it is."""
    return weights if _path_of(weights) is None else absolute_local(weights)


def read_weights_bytes(uri: str, opener: Opener | None = None) -> bytes:
    """Bytes of a state_dict at a local path / file:// URI, or any other URI through ``opener``."""
    path = _local_path(uri)
    if path is not None:
        _require_file(path, uri)
        return _read_hashed(path)[0]
    if opener is None:
        raise WeightsError(f"weights URI {uri}: no reader for scheme {parse_uri(uri)[0]!r} here")
    try:
        return opener(uri)
    except Exception as err:  # the opener's own errors (missing key, denied) become one clear message
        raise WeightsError(f"could not read weights {uri}: {_one_line(err)}") from err


def _check_digest(label: str, digest: str, sha256: str | None, prefix: str | None = None) -> None:
    """Refuse a file whose SHA-256 is not the pinned one (or, unpinned, lacks its name's prefix)."""
    if sha256 is not None:
        if digest != sha256.lower():
            raise WeightsError(f"weights {label} have sha256 {digest}, expected {sha256.lower()}")
    elif prefix is not None and not digest.startswith(prefix):
        raise WeightsError(
            f"weights {label} have sha256 {digest}, but their file name promises one starting {prefix}; "
            "refusing to load them (delete the file to download it again)"
        )


def _torch_load(data: bytes, label: str) -> object:
    """``torch.load(weights_only=True)`` of these bytes: tensors and plain containers only, never code.

    torch's UserWarnings about the file (pickle protocols, storage types) are not the user's
    business and stay off their stderr; a refusal is one WeightsError line.
    """
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _refused_global(err)
        if found or "Unsupported global" in str(err):
            raise WeightsError(
                f"weights {label} refused: the file holds pickled Python objects"
                f"{f' ({found})' if found else ''}, not only tensors, and loading it could run code; "
                "only plain VGG16 state_dicts are loaded"
            ) from None
        raise WeightsError(_not_a_checkpoint(data, label)) from None  # not a pickle at all: "Unsupported operand"
    except Exception as err:
        if isinstance(err, KeyError):  # torch's legacy reader on bytes that are no checkpoint: KeyError('101')
            raise WeightsError(_not_a_checkpoint(data, label)) from None
        raise WeightsError(f"weights {label} are not a loadable state_dict file ({_one_line(err)})") from None


def _not_a_checkpoint(data: bytes, label: str) -> str:
    """Why bytes that torch cannot read at all were refused: a safetensors file (its 8-byte header
    length, then JSON) or anything else that torch.save did not write."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if 0 < size <= len(data) - 8 and data[8:9] == b"{":
        return (f"weights {label} are a safetensors file, which is not read here: save its tensors with "
                "torch.save(state_dict, 'vgg16.pth') and give that file")
    return f"weights {label} are not a PyTorch checkpoint (a file written by torch.save)"


def _three(value: object, what: str, label: str) -> tuple[float, float, float]:
    """A checkpoint's per-channel ``mean`` / ``std``: three finite numbers (std > 0), else WeightsError."""
    from torch import Tensor

    try:
        items = value.tolist() if isinstance(value, Tensor) else list(value)  # type: ignore[arg-type]
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 3 or not all(map(math.isfinite, numbers)) or (what == "std" and min(numbers) <= 0):
        raise WeightsError(f"weights {label}: {what!r} must be 3 finite numbers (one per RGB channel"
                           f"{', > 0' if what == 'std' else ''}), got {value!r:.80}")
    return numbers  # type: ignore[return-value]


def _features_state(obj: object, label: str) -> tuple[dict, tuple | None]:
    """A loaded checkpoint -> ({"N.weight"|"N.bias": tensor}, (mean, std) or None).

    Takes vgg16().state_dict() ("features.N.*", "classifier.*" dropped), vgg16().features'
    ("N.*"), either under "module." / "model." wrappers, or {"state_dict", "mean", "std"}.
    """
    import torch

    if not isinstance(obj, dict):
        raise WeightsError(f"weights {label} hold a {type(obj).__name__}, not a state_dict")
    mean_std = None
    if "state_dict" in obj:
        for one, other in (("mean", "std"), ("std", "mean")):  # one alone would be dropped for ImageNet's pair
            if one in obj and other not in obj:
                raise WeightsError(f"weights {label}: {one!r} without {other!r}; give both (one per RGB channel) or neither")
        if "mean" in obj:
            mean_std = (_three(obj["mean"], "mean", label), _three(obj["std"], "std", label))
        obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise WeightsError(f"weights {label}: 'state_dict' holds a {type(obj).__name__}, not a dict")
    features, keys = {}, {}
    for key in obj:
        name = str(key)
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name.startswith("classifier."):
            continue
        name = name.removeprefix("features.")
        if not _FEATURE_KEY.fullmatch(name):
            raise WeightsError(
                f"weights {label}: key {key!r} is not a VGG16 features key; expected 'features.N.weight' "
                "or 'N.weight' (and .bias; 'module.' / 'model.' prefixes are stripped)"
            )
        if name in keys:  # "features.0.weight" beside "module.features.0.weight": the later won, silently
            raise WeightsError(f"weights {label}: {key!r} and {keys[name]!r} are both layer {name}")
        value = obj[key]
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            what = f"a {type(value).__name__}" if not isinstance(value, torch.Tensor) else f"a {value.layout} tensor"
            raise WeightsError(f"weights {label}: {key!r} holds {what}, not a dense tensor")
        if not value.is_floating_point():  # loading would cast integers and drop a complex value's imaginary part
            raise WeightsError(f"weights {label}: {key!r} holds {str(value.dtype).removeprefix('torch.')}, "
                               "not floating point")
        if not bool(value.isfinite().all()):
            raise WeightsError(f"weights {label}: {key!r} holds NaN or infinite values")
        features[name], keys[name] = value, key
    if not features:
        raise WeightsError(f"weights {label} hold no VGG16 features keys (expected 'features.N.weight' or 'N.weight')")
    return features, mean_std


class LoadedWeights(NamedTuple):
    """A features state_dict ready to load into vgg16().features, its normalization and its id."""

    features: dict | None  # None: random weights
    mean_std: tuple
    weights_id: str


# Loaded state dicts per (source identity, pinned sha256), so one weights file is read (an s3://
# one downloaded) once per process, however many (device, dtype, depth, pooling) extractors use it.
_states: dict[tuple, LoadedWeights] = {}
_states_lock = threading.Lock()


def _hub_checkpoint(name: str, spec: _Named) -> Path:
    """``$TORCH_HOME/hub/checkpoints/<file>`` of named weights, downloaded first if missing."""
    import torch.hub

    file_name = Path(urlparse(spec.url).path).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if not path.is_file():
        # The engine's only network access: named weights asked for and not in the cache.
        match = _HASH_IN_NAME.search(file_name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _download(spec.url, path, match.group(1) if match else None)
        except Exception as err:
            hint = HOW_TO_SUPPLY_WEIGHTS.format(file=file_name, hub=torch.hub.get_dir())
            raise WeightsError(f"VGG16 weights {name!r} are not available ({_one_line(err)}); {hint}") from err
    return path


#: Seconds a weights download may wait on one connect or read before it fails. torch.hub's own
#: download has no timeout: a stalled proxy or a firewall that drops packets hung a first run.
DOWNLOAD_TIMEOUT_S = 60


def _download(url: str, path: Path, hash_prefix: str | None) -> None:
    """Fetch ``url`` to ``path``: streamed to a temporary file beside it, its SHA-256 checked
    against ``hash_prefix``, then renamed into place (a failed or interrupted download leaves
    nothing a later run could mistake for the checkpoint)."""
    import urllib.request

    digest = hashlib.sha256()
    # Created 0666, so the umask decides as for torch.hub's own download (mkstemp's 0600 kept a
    # cache shared by several users readable by the one who filled it only)
    tmp = str(path.parent / f".{path.name}.{os.urandom(8).hex()}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        got = digest.hexdigest()
        if hash_prefix and not got.startswith(hash_prefix):
            raise WeightsError(f"the downloaded file's SHA-256 {got} does not start with {hash_prefix}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_weights_file(weights: str) -> None:
    """Refuse (WeightsError) a local weights path that is not a file; random, named and remote
    weights pass. Needs no torch."""
    path = _path_of(weights)
    if path is not None:
        _require_file(path, weights)


def _require_file(path: Path, label: str) -> None:
    if path.is_dir():
        raise WeightsError(f"weights file {label} is a folder, not a weights file (a state_dict saved with torch.save)")
    if not path.is_file():
        raise WeightsError(f"weights file {label} does not exist (weights are a state_dict's path, file:// or s3:// "
                           f"URI, or one of {', '.join(NAMED_WEIGHTS)}, random)")


def weights_key(weights: str, sha256: str | None) -> tuple:
    """What names loaded weights in this process's caches: a local file by its resolved path, mtime
    and size (a file replaced in place is read again: its id, and so every output key, follows it),
    anything else by its spelling. A missing local file is a WeightsError."""
    path = _path_of(weights)
    if path is None:
        return (weights, sha256)
    _require_file(path, weights)
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size, sha256)


def load_weights(weights: str, sha256: str | None, seed: int, opener: Opener | None) -> LoadedWeights:
    """The features state_dict (None for random), its (mean, std) and the weights id.

    Every file is hashed before it is unpickled, and unpickled with ``weights_only=True``
    from the bytes that were hashed.
    """
    if weights == "random":
        return LoadedWeights(None, _CAFFE_MEAN_STD, f"random(seed={seed})")
    check_weights_file(weights)
    spec = _named_weights()[weights] if weights in _NAMES else None
    path = _hub_checkpoint(weights, spec) if spec else _local_path(weights)
    key = weights_key(str(path), sha256) if path is not None else (weights, sha256)
    if spec is not None:  # the enum's normalization, not a bare state_dict's, even from the same file
        key = (weights, *key)
    with _states_lock:
        if key in _states:
            return _states[key]
    if spec is not None:
        data, digest = _read_hashed(path)
        match = _HASH_IN_NAME.search(path.name)
        _check_digest(str(path), digest, sha256, match.group(1) if match else None)
        features, mean_std = _features_state(_torch_load(data, str(path)), str(path))[0], (spec.mean, spec.std)
        # torchvision's name only where the file is what the name promises: a pinned hash replaces
        # that check, and results are keyed by this id, not by the pin (other bytes, own id; with
        # the enum's name, since its normalization is the enum's, not a bare state_dict's default)
        promised = match is None or digest.startswith(match.group(1))
        weights_id = f"torchvision:{path.name}" if promised else f"{weights}:sha256:{digest}"
    else:
        if path is not None:
            data, digest = _read_hashed(path)
        else:
            data = read_weights_bytes(weights, opener)
            digest = hashlib.sha256(data).hexdigest()
        _check_digest(weights, digest, sha256)
        features, mean_std = _features_state(_torch_load(data, weights), weights)
        mean_std, weights_id = mean_std or _IMAGENET_MEAN_STD, f"sha256:{digest}"
    loaded = LoadedWeights(features, mean_std, weights_id)
    with _states_lock:
        _states[key] = loaded
    return loaded


def clear_weights() -> None:
    """Forget every loaded state dict (tests; freeing memory)."""
    with _states_lock:
        _states.clear()
