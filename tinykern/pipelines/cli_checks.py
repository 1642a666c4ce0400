"""Argument checks shared by the `tinykern` commands.

Every argument that can be checked without loading a model is checked first; a bad one ends
the command with one line on stderr, `<command>: error: <what>`, and exit code 2 (argparse's
code for usage errors), before anything is read or written. Checks raise ValueError (or the
OSError a missing path gives) naming the flag and the path; `one_line_errors` turns those into
that line. Only the standard library is imported here: torch and PIL load inside the checks
that need them.
"""

import contextlib
import os
import sys
from pathlib import Path


def fail(prog, message):
    """Print `prog: error: message` on stderr and exit with code 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


@contextlib.contextmanager
def one_line_errors(prog):
    """Bad input (ValueError, or an OSError such as a missing or unreadable file) inside the
    block ends the command with one line and exit code 2 instead of a traceback."""
    try:
        yield
    except (ValueError, OSError) as e:
        fail(prog, e)


def device(flag, name):
    """The torch.device `name`, refused when it is not a device name or its backend has no
    device here (e.g. --device cuda on a machine without CUDA)."""
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{flag} {name}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"{flag} {name}: no {dev.type.upper()} device is available")
    count = getattr(backend, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"{flag} {name}: there are only {count} {dev.type.upper()} devices")
    return dev


def existing(flag, path, kind=None):
    """`path` with `~` expanded, refused unless it exists, is readable and (kind "file" or
    "dir") is of that kind."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{flag} {path}: does not exist")
    if kind == "file" and not path.is_file():
        raise ValueError(f"{flag} {path}: not a file")
    if kind == "dir" and not path.is_dir():
        raise ValueError(f"{flag} {path}: not a folder")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{flag} {path}: not readable")
    return path


def _writable_parent(flag, path):
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder {parent} is not writable")


def image_file(flag, path):
    """An output image path with `~` expanded: its folder exists and is writable, it is not a
    folder, and its extension names a format PIL can write."""
    from PIL import Image

    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder, not an image file")
    _writable_parent(flag, path)
    image_format(flag, path, Image)
    return path


def image_format(flag, path, image_module):
    """The PIL format name for `path`'s extension, refused when PIL cannot write it."""
    image_module.init()
    fmt = image_module.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in image_module.SAVE:
        raise ValueError(f"{flag} {path}: {path.suffix or 'no extension'} is not an image format PIL writes "
                         f"(.png, .jpg, .webp, ...)")
    return fmt


def new_folder(flag, path):
    """An output folder with `~` expanded: its parent exists and is writable, and it is either
    absent or an empty folder (nothing already there is overwritten)."""
    path = Path(path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{flag} {path}: exists and is not a folder")
        if any(path.iterdir()):
            raise ValueError(f"{flag} {path}: the folder is not empty; name a new one")
    _writable_parent(flag, path)
    return path


def output_folder(flag, path):
    """A folder to write into (created if absent) with `~` expanded: refused when it is a file,
    or when it (or, if absent, its parent) is not writable."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {path}: the folder is not writable")
    else:
        _writable_parent(flag, path)
    return path


def at_least(flag, value, minimum):
    """Refuse a number below `minimum` (or NaN)."""
    if value is not None and not value >= minimum:
        raise ValueError(f"{flag} {value}: must be at least {minimum}")
    return value


def positive(flag, value):
    """Refuse a number that is not above zero (or NaN)."""
    if value is not None and not value > 0:
        raise ValueError(f"{flag} {value}: must be above 0")
    return value


def save_image(image, path):
    """Save a PIL image atomically: written beside `path` under a temporary name, then renamed
    over it, so that an interrupted save never leaves a truncated image at `path`."""
    from PIL import Image

    path = Path(path).expanduser()
    fmt = image_format("output", path, Image)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as f:
            image.save(f, format=fmt)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
