"""``python -m sepico_fast.train [--preset NAME] [flags]`` (see ``--help``)."""
import sys

from .config import parse_args


def main(argv=None) -> None:
    from .implementations import configure_logging
    from .runner import run

    configure_logging()  # the one-time fallback WARNINGs and implementation INFO lines
    run(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
