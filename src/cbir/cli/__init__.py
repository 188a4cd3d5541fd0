"""``cbir`` command line: one thin sub-command per stage.

Each stage lives in ``cbir/cli/<stage>.py`` and exposes ``register(subparsers)``, which adds its
parser(s) with ``set_defaults(func=handler)``. A handler parses nothing itself, calls the library,
prints, and returns an exit code. Heavy imports (torch, faiss) happen inside handlers so that
``cbir --help`` stays fast, and ``cbir COMMAND ...`` registers only that command's parser:
building the parser of ``cbir search`` imports neither torch, torchvision nor timm (checked by
tests/test_search_cli.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

# Order here is the order in `cbir --help`.
STAGES = ("extract", "models", "whiten", "tune", "adapt", "evaluate", "download", "index", "search", "serve", "mine",
          "train", "cache")

EPILOG = """\
typical flow:
  cbir extract photos/ --out feats/            # one L2-normalised descriptor per image
  cbir index build photos/ --out my.index      # a persistent, searchable index
  cbir search my.index --image query.jpg       # ranked results
  cbir evaluate --dataset demo                 # mAP on the bundled demo benchmark
Run `cbir COMMAND --help` for each command's options; `cbir --debug COMMAND ...` shows the full
traceback of an error instead of its one-line message.
"""


class CLIError(Exception):
    """An error to report to the user as one line, exit code 2."""


# Errors of the user's making (files, settings, data) that the library raises: one line, exit 2.
# Any other exception is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (CLIError, OSError, ValueError, KeyError, LookupError)


def is_user_error(exc: BaseException) -> bool:
    """True for the errors reported as one line: the ones above, and every exception class defined
    by cbir itself (WeightsUnavailable, FormatError, ImageError, IncompatibleDescriptorError, ...)."""
    return isinstance(exc, USER_ERRORS) or type(exc).__module__.split(".")[0] == "cbir"


def error_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (KeyError's quotes dropped; the first line of a long text)."""
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    text = str(msg).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines) if len(lines) <= 3 else lines[0] + " ..."


class _Version(argparse.Action):
    """``--version``: the package metadata is read only when asked (the lookup costs ~0.1-0.2 s)."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        from .. import __version__

        print(f"cbir {__version__}")  # standard output, as argparse's own version action
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``cbir`` parser; with ``command`` (one of :data:`STAGES`) only that sub-command is
    registered, so that ``cbir search ...`` imports the search command's module and nothing else."""
    parser = argparse.ArgumentParser(
        prog="cbir",
        description="Deep-learning instance image retrieval: find the other photos of the same place or object.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback (may also come after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for stage in (command,) if command in STAGES else STAGES:
        importlib.import_module(f"{__name__}.{stage}").register(sub)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The sub-command named in ``argv`` (its first word that is not an option), else None."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in STAGES else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("CBIR_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe (`cbir ... | head`) shows here, inside the handler below
        return code
    except BrokenPipeError:
        # the reader went away: no message, no traceback; stdout goes to devnull so that Python's own
        # flush at exit does not fail again (the Python docs' recipe, "Note on SIGPIPE"); exit status 1
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug or not is_user_error(exc):
            raise
        print(f"cbir {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
