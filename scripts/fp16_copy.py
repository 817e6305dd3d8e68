"""Copy one of our safetensors model files with its weights in fp16 (metadata unchanged).

    python scripts/fp16_copy.py runs/default/stage2/model.safetensors models/default/model.safetensors
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.weights import cast_weights_file  # noqa: E402
from common.cli import ArgumentParser, run  # noqa: E402


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    cast_weights_file(args.source, args.target)
    print(f"wrote {args.target} ({args.target.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    run(main)
