"""`nst stylize`: one content/style pair, no orchestration.

Options are generated from StyleParams (names, types, choices, help, defaults), never restated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import types
import typing
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path

from pydantic import BaseModel, ValidationError

from .errors import NSTError, hide_userinfo
from .params import StyleParams
from .validation import format_validation_error
from .weights import check_weights_file

if typing.TYPE_CHECKING:
    from PIL import Image

__all__ = ["add_model_options", "model_from_args", "add_stylize_parser", "run_stylize", "ProgressBar", "one_line",
           "PipeSafe", "pipe_safe_streams",
           "without_userinfo"]


def _option_type(annotation) -> dict:
    """argparse kwargs for a pydantic field annotation: type, choices, nargs."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if len(args) > 1:  # e.g. tile_size: auto or a number; the model parses and refuses
            return {"type": str, "metavar": "|".join(_shown(a) for a in args)}
        return _option_type(args[0])
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    if typing.get_origin(annotation) is list:
        # No argparse choices for lists (layer names): the model refuses an unknown name with a
        # message that lists the valid ones, instead of a 36-name usage line.
        return {"type": str, "nargs": "+", "metavar": "NAME" if typing.get_origin(args[0]) is typing.Literal else None}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": annotation if annotation in (int, float) else str}


def _shown(annotation) -> str:
    """How one member of a union reads in a metavar: its literal values or its type's name."""
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(map(str, typing.get_args(annotation)))
    return getattr(annotation, "__name__", str(annotation)).upper()


def add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel], *, skip: tuple[str, ...] = ()) -> None:
    """One --kebab-case option per model field; unset options stay unset (the model's default applies)."""
    group = parser.add_argument_group(model.model_config.get("title") or model.__name__)
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        kwargs = _option_type(info.annotation)
        default = info.get_default(call_default_factory=True)
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        shown = "unset" if shown is None or shown == "" else shown  # as the README's parameter table says
        group.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS,
            help=f"{info.description} (default: {shown})".replace("%", "%%"), **kwargs,  # argparse formats help
        )


def model_from_args(model: type[BaseModel], args: argparse.Namespace):
    """Build ``model`` from the options that were given; the model validates and fills defaults."""
    return model(**args_for(model, args))


def args_for(model: type[BaseModel], args: argparse.Namespace) -> dict:
    """The options given that are fields of ``model``, unvalidated."""
    return {k: v for k, v in vars(args).items() if k in model.model_fields}


def without_userinfo(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it removed: an error line never shows
    credentials (``errors.hide_userinfo``, which every NSTError's message goes through)."""
    return hide_userinfo(text)


def one_line(err: Exception) -> str:
    """A validation or NST error as one line for stderr."""
    if isinstance(err, ValidationError):
        return format_validation_error(err)
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # a library's own line breaks


class PipeSafe:
    """A text stream (stdout, stderr) whose writes never fail because its reader went away (`nst
    batch | head`, a `less` quit early): from the first broken pipe on, its descriptor writes to
    /dev/null. Without it the first progress line or log record after that raised: Prefect's
    console handler (rich) exited the flow with SystemExit(1), the run crashed with no image
    written, and a finished run's last print exited 1 with a traceback."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()

    def _gone(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def __getattr__(self, name: str):
        if name == "_stream":  # copy.copy and pickle look before __init__ has run
            raise AttributeError(name)
        return getattr(self._stream, name)


@contextmanager
def pipe_safe_streams():
    """sys.stdout and sys.stderr as PipeSafe streams while the block runs (a command's whole run:
    Prefect's log handler takes the stream it finds when it is set up), flushed through them at
    the end: a last line still buffered (stdout to a pipe is) would meet the broken pipe at the
    interpreter's exit, and exit 120. A stream that is None (started with it closed) stays None."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (None if s is None else PipeSafe(s) for s in saved)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, PipeSafe):
                stream.flush()
        sys.stdout, sys.stderr = saved


#: Seconds between progress lines when the stream is no terminal (a log file, cron's mail).
PLAIN_EVERY_S = 30.0


def terminal_columns(stream=None) -> int:
    """The width in columns of the terminal ``stream`` writes to (the bar's: stderr, when stdout
    goes to a file or a pipe), else of stdout's; 80 where neither can be told."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size((80, 24)).columns


class ProgressBar:
    """A one-line text progress bar on a stream (stderr), redrawn in place on a terminal; elsewhere
    (a log file, cron) a plain "label k/n note" line at most every PLAIN_EVERY_S and at the end,
    never a carriage return that would hide the log line after it from grep."""

    def __init__(self, total: int, label: str = "", stream=None, width: int = 30):
        self.stream = sys.stderr if stream is None else stream  # read now: tests and nst swap sys.stderr
        self.total, self.label, self.width = total, label, width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = -PLAIN_EVERY_S
        self.shown = 0  # characters of the line drawn last: the next one blanks what it does not cover

    def update(self, done: int, note: str = "") -> None:
        now = time.monotonic()
        if done < self.total and now - self._last < (0.1 if self.tty else PLAIN_EVERY_S):
            return
        self._last = now
        if not self.tty:
            self.stream.write(f"{self.label}{done}/{self.total} {note}".rstrip() + "\n")
            self.stream.flush()
            return
        filled = int(self.width * done / max(self.total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        # within the terminal's width: a line that wraps is not redrawn by "\r" (it returns to the
        # wrapped part), so a bar padded to 100 columns left a line per redraw on an 80-column terminal
        line = f"{self.label}[{bar}] {done}/{self.total} {note}".rstrip()[:terminal_columns(self.stream) - 1]
        self.stream.write("\r" + line.ljust(self.shown))
        self.shown = len(line)
        if done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def add_stylize_parser(subparsers, opener: Callable[[str], bytes] | None = None) -> argparse.ArgumentParser:
    """The `stylize` subcommand. ``opener`` reads weights URIs other than local paths (s3://)."""
    parser = subparsers.add_parser(
        "stylize", help="stylize one content image with one or more style images",
        description="Stylize CONTENT with STYLE (several STYLE images are blended). Writes OUT and OUT.json.",
    )
    parser.add_argument("content", help="content image file")
    parser.add_argument("style", nargs="+", help="style image file(s)")
    parser.add_argument("-o", "--output", required=True, help="output image (.png, .jpg, .webp)")
    parser.add_argument("--quality", type=int, default=92, help="JPEG/WebP quality 1-100 (default: 92)")
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    add_model_options(parser, StyleParams)
    parser.set_defaults(handler=lambda args: run_stylize(args, opener))
    return parser


def _read(path: str) -> bytes:
    """The file's bytes, at most MAX_INPUT_BYTES (no image decode_image accepts is larger): a pipe
    (``<(curl …)``) is read too, but /dev/zero or a 50 GB file is refused, not read into memory."""
    from .imageio import MAX_INPUT_BYTES

    too_large = NSTError(f"{path}: over the limit of {MAX_INPUT_BYTES:,} bytes for an input image")
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_INPUT_BYTES:  # a regular file: refused unread (a pipe says 0)
                raise too_large
            data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as err:
        raise NSTError(f"{path}: cannot read ({err.strerror or err})") from None
    if len(data) > MAX_INPUT_BYTES:
        raise too_large
    return data


def _temp_beside(target: Path) -> tuple[int, str]:
    """A new temporary file in ``target``'s folder (fd, path): a short name, so any output name fits."""
    return tempfile.mkstemp(dir=target.parent, prefix=".nst-", suffix=".tmp")


def _write(path: Path, data: bytes | None) -> None:
    """Write ``data`` to ``path`` whole or not at all (a temporary file beside it, then renamed:
    a Ctrl-C or a full disk mid-write leaves no half image under its name); None: create the
    folder ``path``. Failures are one NSTError line."""
    tmp = None
    try:
        if data is None:
            path.mkdir(parents=True, exist_ok=True)
            return
        target = Path(os.path.realpath(path))  # an output that is a link: its target, not the link, is replaced
        fd, tmp = _temp_beside(target)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        tmp = None
    except OSError as err:
        raise NSTError(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        if tmp is not None:
            with suppress(OSError):
                os.unlink(tmp)


def _check_output(out: Path, inputs: list[str]) -> None:
    """Refuse, before the optimization, an output that would replace an input image, that is a
    folder, or whose folder takes no file (found only after minutes of work before)."""
    try:
        for given in inputs:
            if out.exists() and os.path.exists(given) and os.path.samefile(out, given):
                raise NSTError(f"-o {out} is the input image {given}; choose another output")
        if out.is_dir():
            raise NSTError(f"{out}: is a folder; give a file name (e.g. {out / 'result.png'})")
        _write(out.parent, None)
        fd, probe = _temp_beside(Path(os.path.realpath(out)))  # where _write will make its own
        os.close(fd)
        os.unlink(probe)
    except OSError as err:  # a folder this user may not search or write
        raise NSTError(f"{out}: cannot write ({err.strerror or err})") from None


def _check_sizes(params: StyleParams, content: tuple[str, Image.Image], *styles: tuple[str, Image.Image]) -> None:
    """The engine's size checks before torch loads: at ``image_size`` each side of the content is
    at least ``content_min_side()``, of a style ``style_min_side()`` (ImageTooSmallError names it)."""
    from .imageio import check_min_side, fit_longest

    checks = [(content, params.content_min_side())] + [(s, params.style_min_side()) for s in styles]
    for (name, img), need in checks:
        check_min_side(fit_longest(img.size, params.image_size), need, name)


def run_stylize(args: argparse.Namespace, opener: Callable[[str], bytes] | None = None) -> int:
    from .imageio import decode_image, encode_image, format_for, read_back

    params = model_from_args(StyleParams, args)
    params.blend_weights(len(args.style))  # ParamsError for a count that does not fit, before any read
    fmt = format_for(args.output)
    if not 1 <= args.quality <= 100:
        raise NSTError(f"--quality {args.quality} is outside 1-100")
    content = decode_image(_read(args.content), args.content)
    styles = [decode_image(_read(p), p) for p in args.style]
    _check_sizes(params, (args.content, content.rgb), *zip(args.style, (s.rgb for s in styles)))
    check_weights_file(params.weights)
    content_img = content.merged()
    out = Path(args.output)
    _check_output(out, [args.content, *args.style])  # before the optimization: fails in a second, not after it
    from .optimize import stylize  # torch: ~3 s to import, after the checks that need none

    bar = None if args.no_progress else ProgressBar(params.iterations, "stylize ")

    def progress(ev) -> None:
        bar.total = ev.total  # an early stop (stop_tolerance) lowers it; the bar still ends full
        bar.update(ev.iteration, f"loss {ev.loss:.4g}" + (f" at {ev.where}" if ev.where else ""))

    result = stylize(content_img, [s.rgb for s in styles], params, progress=progress if bar else None,
                     opener=opener, content_name=args.content, style_names=args.style,
                     written=read_back(fmt, args.quality))  # its losses are the file's
    _write(out, encode_image(result.image, fmt, quality=args.quality))
    meta = {
        **result.metadata,
        "content": args.content,
        "styles": args.style,
        "output": str(out),
        "losses": result.losses,
    }
    _write(Path(f"{out}.json"), json.dumps(meta, indent=2).encode())
    final = result.losses["final"]
    print(f"wrote {out} and {out}.json (loss {result.losses['initial']['total']:.4g} -> {final['total']:.4g}, "
          f"{result.metadata['evaluations']} evaluations, {result.metadata['seconds']['total']:.1f}s)")
    return 0

