"""``python -m sepico_fast.models [--size H W] [ARCH ...]``: parameter counts and FLOPs per image."""
from __future__ import annotations

import argparse

from . import ARCHS
from .flops import cost_table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sepico_fast.models", description=__doc__)
    parser.add_argument("archs", nargs="*", default=list(ARCHS), metavar="ARCH", help=f"architectures (default: all of {list(ARCHS)})")
    parser.add_argument("--size", nargs=2, type=int, default=(640, 640), metavar=("H", "W"),
                        help="input size (default 640 640, the training crop)")
    args = parser.parse_args(argv)
    unknown = [a for a in args.archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown ARCH {unknown}; choose from {list(ARCHS)}")
    print(f"GFLOPs per image at {args.size[0]}x{args.size[1]}, forward pass\n")
    print(cost_table(args.archs, *args.size))
    print("\n1 multiply-add = 2 FLOPs; matmuls/convolutions/attention only.\n"
          "'backbone+decode' is inference (predict); the projection head runs in training only.\n"
          "A training step costs about 3x the forward FLOPs of what is back-propagated.")


if __name__ == "__main__":
    main()
