"""Build driver: setuptools hands the native part to CMake + ninja.

    pip install -e . --no-build-isolation

Environment:
    TOKENKERNELS_CUDA=0|1       force CUDA kernels off / on (default: auto, i.e. nvcc + CUDA torch)
    TOKENKERNELS_CUDA_ARCHS     CUDA architectures, default "80;90a"
    TOKENKERNELS_BUILD_DIR      CMake build folder, default build/py<ver>
    TOKENKERNELS_BENCH=0        skip the tokenkernels-bench binary
    MAX_JOBS                    parallel compile jobs
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


# tokenkernels._C holds no Python functions, only the op registrations, so it is built against
# CPython's stable ABI (Py_LIMITED_API, CMakeLists.txt): one _C.abi3.so, one cp311-abi3 wheel
# for Python 3.11 and every later CPython. (The wheel still belongs to the torch it was built
# against: libtorch's C++ ABI changes between torch releases.)
LIMITED_API = "cp311"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[], py_limited_api=True)


def _install(src, dest):
    """Copy to a temporary name and rename over dest: a process that has the old file mapped
    (a running test or bench) keeps its inode instead of seeing it rewritten under it."""
    tmp = Path(str(dest) + ".tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dest)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build_dir = Path(os.environ.get(
            "TOKENKERNELS_BUILD_DIR", ROOT / "build" / f"py{sys.version_info[0]}{sys.version_info[1]}"))
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("TOKENKERNELS_CUDA", "AUTO")
        cfg = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DTOKENKERNELS_CUDA={cuda}",
            f"-DTOKENKERNELS_CUDA_ARCHS={os.environ.get('TOKENKERNELS_CUDA_ARCHS', '80;90a')}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DTOKENKERNELS_BENCH={'ON' if os.environ.get('TOKENKERNELS_BENCH', '1') != '0' else 'OFF'}",
        ]
        subprocess.check_call(cfg)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        bench = os.environ.get("TOKENKERNELS_BENCH", "1") != "0"
        targets = ["_C"] + (["tokenkernels-bench"] if bench else [])
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs, "--target", *targets])
        # The module goes where setuptools expects it (the source tree for editable installs).
        built = build_dir / "_C.abi3.so"
        dest = Path(self.get_ext_fullpath(ext.name))   # .../tokenkernels/_C.abi3.so
        dest.parent.mkdir(parents=True, exist_ok=True)
        _install(built, dest)
        # A version-tagged _C.cpython-3XX-*.so left by an older build would be imported before
        # the .abi3.so (CPython tries the tagged suffix first): remove it.
        for pkg_dir in {dest.parent, ROOT / "python" / "tokenkernels"}:
            for stale in pkg_dir.glob("_C.*.so"):
                if stale.name != dest.name:
                    stale.unlink()
        # The microbenchmark binary travels inside the package (see tokenkernels/_bench_bin.py).
        # Editable installs (setuptools >= 64) build in a temporary tree and only carry the
        # extension module back, so the binary also goes straight into the source package.
        if bench:
            for pkg_dir in {dest.parent, ROOT / "python" / "tokenkernels"}:
                bin_dir = pkg_dir / "_bin"
                bin_dir.mkdir(parents=True, exist_ok=True)
                _install(build_dir / "tokenkernels-bench", bin_dir / "tokenkernels-bench")


setup(
    package_dir={"": "python"},
    packages=["tokenkernels", "tokenkernels._ops", "tokenkernels.reference",
              "tokenkernels.integrations", "tokenkernels.bench"],
    package_data={"tokenkernels": ["_bin/tokenkernels-bench"]},
    ext_modules=[CMakeExtension("tokenkernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    options={"bdist_wheel": {"py_limited_api": LIMITED_API}},
)
