"""
errors.py: how every command line reports: its expected failures and its progress. Standard
library only, at the bottom of the import graph, so that any module can raise InputError and any
script can use run() and progress().

  InputError        bad input from the user (a value, a file, a checkpoint): a ValueError whose
                    message names the argument or file and says what was found
  read_text         a user's text file: a regular file of at most MAX_TEXT_BYTES, UTF-8, not
                    empty; errors name the file and the option
  safetensors_header  the header of a safetensors file, checked complete without reading tensors
  check_output      an output path can be written (its folder exists) before any work is done
  check_folder      an input folder (--model) exists
  ArgumentParser    argparse, but a bad argument is one line on stderr (no usage block), exit 2
  run               a command line's body: an expected failure becomes one line on stderr,
                    `prog: error: message`, and exit code 1; Ctrl-C one line and exit code 130;
                    anything else (a bug) keeps its traceback
  progress          a command's progress line on stderr, `[  12.3 s] message`
  passive_openmp    idle OpenMP threads sleep instead of spinning, for the processes our scripts start

Exit codes: 2 when the command line itself is wrong (ArgumentParser, and the scripts' own checks of
their arguments before any work), 1 when something it names cannot be used (a file, a checkpoint,
not enough memory), 130 when interrupted (Ctrl-C, as shells report SIGINT). A traceback means a bug.
"""
from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from pathlib import Path


class InputError(ValueError):
    """Bad input from the user. A ValueError, so `except ValueError` keeps catching it."""


# A text input larger than this is refused before it is read: 16 MiB is millions of tokens, far past
# any context the models here accept, and a path like /dev/zero must not be read without bound.
MAX_TEXT_BYTES = 16 * 2**20
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on a header
IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")  # figures matplotlib's Agg writes

# What `run` turns into one line: bad input, and the OS errors of files the user named.
EXPECTED = (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
            UnicodeDecodeError)


def one_line(e: BaseException) -> str:
    """The message of an expected failure on one line. OSErrors raised by open() carry the file
    name apart from the message: 'No such file or directory: x' rather than '[Errno 2] ...'."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        msg = f"{e.strerror}: {e.filename}"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


def run(main, *args, prog: str | None = None):
    """Call main(*args) as the body of a command line. An expected failure (EXPECTED) prints
    `prog: error: <message>` as one line on stderr and exits with code 1; any other exception
    propagates with its traceback, because it is a bug."""
    prog = prog or Path(sys.argv[0]).name
    try:
        return main(*args)
    except EXPECTED as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C: the user's choice, not a bug
        print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """A bad argument: one line on stderr and exit code 2 (argparse would add the usage block;
        --help still shows it)."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def read_text(path, what: str) -> str:
    """The text of a user's file, which must be a regular file of at most MAX_TEXT_BYTES, UTF-8
    and not empty; `what` names it in errors (e.g. "--context"). Raises InputError."""
    p = Path(path)
    try:
        st = p.stat()
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{what} {path}: is a folder, expected a text file")
        if not stat.S_ISREG(st.st_mode):  # a device or a pipe could be read without end
            raise InputError(f"{what} {path}: not a regular file, expected a text file")
        if st.st_size > MAX_TEXT_BYTES:
            raise InputError(f"{what} {path}: {st.st_size:,} bytes, more than the {MAX_TEXT_BYTES:,} "
                             "a text input may have")
        data = p.read_bytes()
    except OSError as e:
        raise InputError(f"{what} {path}: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                         f"{e.start})") from e
    if not text.strip():
        raise InputError(f"{what} {path}: the file is empty")
    return text


def safetensors_header(path, what: str) -> dict:
    """The JSON header of a safetensors file (tensor names -> dtype, shape, data_offsets; and
    "__metadata__"), checked before any tensor is read: the file must be one, and complete (a
    truncated file ends before its last tensor). Raises InputError naming `what` and the file."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what} {path}: is a folder, expected a safetensors file")
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")  # the header's length in bytes
            raw = f.read(n) if 2 <= n <= MAX_HEADER_BYTES else b""
    except OSError as e:
        raise InputError(f"{what} {path}: {e.strerror or e}") from e
    if not 2 <= n <= MAX_HEADER_BYTES or size < 8:
        raise InputError(f"{what} {path}: not a safetensors file")
    try:
        header = json.loads(raw)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, AttributeError, KeyError, TypeError, IndexError):  # not JSON, or not this layout
        if 8 + n > size:
            raise InputError(f"{what} {path}: truncated ({size:,} bytes, within its {n:,}-byte header)") from None
        raise InputError(f"{what} {path}: not a safetensors file") from None
    if 8 + n + end > size:
        raise InputError(f"{what} {path}: truncated ({size:,} bytes, its header describes {8 + n + end:,})")
    return header


def check_output(path, what: str, suffixes=None) -> str | None:
    """Why `path` cannot be written as an output file (its folder is missing or not writable, it is
    a folder, or its suffix is not one of `suffixes`), or None if it can. Checked before any work,
    so that a long run does not fail at its end."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        return f"{what} {path}: is a folder, expected a file name"
    if suffixes and p.suffix.lower() not in suffixes:
        return f"{what} {path}: unknown format {p.suffix or '(no suffix)'!r}; use one of {', '.join(suffixes)}"
    if not parent.is_dir():
        return f"{what} {path}: folder {parent} does not exist"
    if not os.access(parent, os.W_OK):
        return f"{what} {path}: folder {parent} is not writable"
    return None


def check_folder(path, what: str) -> str | None:
    """Why `path` is not an existing folder, or None if it is (for a --model argument)."""
    p = Path(path).expanduser()
    if not p.exists():
        return f"{what} {path}: no such folder"
    if not p.is_dir():
        return f"{what} {path}: is a file, expected a folder"
    return None


_START = time.perf_counter()  # about when the process started: errors.py is imported first


def progress(msg: str):
    """A command's progress line, `[  12.3 s] msg` (seconds since start), on stderr for every
    command: stdout holds the results alone, so `python bench.py > report.txt` keeps the report
    whole, and a terminal still shows both."""
    print(f"[{time.perf_counter() - _START:6.1f} s] {msg}", file=sys.stderr, flush=True)


def passive_openmp():
    """Let idle OpenMP threads sleep instead of spinning, unless the user chose a policy.

    Called by each script when it runs as a command line (and by the tests' conftest), before the
    first `import torch`: OpenMP reads OMP_WAIT_POLICY once, when torch loads it, so a later setting
    has no effect. Why: with the default policy every idle thread spins for a while after each
    parallel region; on a CPU shared with another busy process, each of the hundreds of small ops
    of a decode step then waits for a spinning thread to give a core back (measured on a 2-core
    machine: one decode step 3.6 s instead of 0.09 s). Importing kvzip or model from your own
    script changes nothing: your process, your policy (set OMP_WAIT_POLICY=PASSIVE yourself on a
    shared CPU).
    """
    if "torch" not in sys.modules:  # afterwards it would have no effect, and would misreport it
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
