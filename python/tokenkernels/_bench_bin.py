"""Console entry point ``tokenkernels-bench``: the C++ microbenchmark binary shipped inside the
package, run through the Python harness (:mod:`tokenkernels.bench.cpp`: tables, progress lines,
CSV, --wait-idle)."""
import sys
from pathlib import Path


def binary_path() -> Path:
    return Path(__file__).resolve().parent / "_bin" / "tokenkernels-bench"


def main() -> None:
    from tokenkernels.bench.cpp import main as run

    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
