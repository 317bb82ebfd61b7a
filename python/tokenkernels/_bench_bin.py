"""Console entry point that runs the C++ microbenchmark binary shipped inside the package."""
import os
import sys
from pathlib import Path


def binary_path() -> Path:
    return Path(__file__).resolve().parent / "_bin" / "tokenkernels-bench"


def main() -> None:
    exe = binary_path()
    if not exe.exists():
        sys.exit(f"tokenkernels-bench: {exe} is missing; rebuild with pip install -e . --no-build-isolation")
    os.execv(str(exe), [str(exe), *sys.argv[1:]])


if __name__ == "__main__":
    main()
