"""``python -m sepico_fast.train [--preset NAME] [flags]`` (see ``--help``)."""
import sys

from .config import parse_args


def main(argv=None) -> None:
    from .runner import run

    run(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
