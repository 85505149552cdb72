"""``python -m sepico_fast.train [--preset NAME] [flags]`` (see ``--help``)."""
import sys

from .config import parse_args


def main(argv=None) -> None:
    from .faults import RunStopped
    from .implementations import configure_logging
    from .runner import run

    configure_logging()  # the one-time fallback WARNINGs and implementation INFO lines
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(cfg)
    except RunStopped as stop:  # a signal or a known fault: one line, no traceback
        print(f"sepico_fast.train: {stop}", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None


if __name__ == "__main__":
    main()
