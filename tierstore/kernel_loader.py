"""The one place that finds, compiles and caches the CUDA kernels of ``kernels/``.

Each ``.cu`` file is one operation (``lookup.cu``, ``insert.cu``, ...); it is compiled once per
process and device by CuPy's NVRTC into a ``cupy.RawModule``, with ``#line 1 "file.cu"``
prepended so that a compiler error names the real file and line. The compiler options live in
:data:`NVRTC_OPTIONS` and :data:`NVCC_OPTIONS`, nowhere else.

Sources are found in the repository's ``kernels/`` directory or, in an installed wheel, in the
package ``tierstore._kernels`` (``pyproject.toml`` maps one onto the other).

A policy or an optimizer names the kernels it runs on with a
:class:`~tierstore.cuda_functor.CudaFunctor`.

Run ``python -m tierstore.kernel_loader --nvcc`` to compile every ``.cu`` with the machine's
``nvcc`` for sm_90 (what CI does on a machine with no GPU), the tests' own kernels of
``kernels/testing/`` included; it exits non-zero on any error and does not import CuPy.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Exact IEEE division and square root, no fast math: the kernels must agree with the CPU
# backend to rounding (and bit for bit for the hashing).
NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)
NVCC_OPTIONS: tuple[str, ...] = ("-std=c++17", "-arch=sm_90")


def kernel_dir() -> Path:
    """The directory holding the ``.cu`` and ``.cuh`` sources."""
    repo = Path(__file__).resolve().parent.parent / "kernels"
    if (repo / "common.cuh").is_file():
        return repo
    from importlib import resources

    return Path(str(resources.files("tierstore._kernels")))


def sources() -> list[Path]:
    """Every kernel source file (``*.cu``) sorted by name, then the tests' own kernels
    (``testing/*.cu``: not shipped in the wheel, absent from an installed one)."""
    return sorted(kernel_dir().glob("*.cu")) + sorted(kernel_dir().glob("testing/*.cu"))


def source_text(name: str) -> str:
    """The text of ``kernels/<name>`` with a ``#line`` directive naming the file."""
    path = kernel_dir() / name
    return f'#line 1 "{name}"\n' + path.read_text()


@functools.cache
def module(name: str, device_index: int):
    """The compiled ``cupy.RawModule`` of ``kernels/<name>`` on one device (compiled once).
    ``name`` may name a file of ``kernels/testing/`` (``"testing/hashing.cu"``)."""
    import cupy

    options = (*NVRTC_OPTIONS, f"-I{kernel_dir()}")
    with cupy.cuda.Device(device_index):
        mod = cupy.RawModule(code=source_text(name), options=options, backend="nvrtc")
        mod.compile()
    return mod


@functools.cache
def kernel(name: str, function: str, device_index: int):
    """The ``cupy.RawKernel`` ``function`` of ``kernels/<name>`` on a device."""
    return module(name, device_index).get_function(function)


# ------------------------------------------------------------------ the CI check (no GPU)
def compile_all_with_nvcc(nvcc: str = "nvcc", verbose: bool = False) -> int:
    """Compiles every ``.cu`` with ``nvcc -arch=sm_90 -c``; returns how many failed."""
    exe = shutil.which(nvcc) or (nvcc if os.path.isfile(nvcc) else None)
    if exe is None:
        print(f"kernel_loader: {nvcc!r} not found", file=sys.stderr)
        return 1
    failed = 0
    kdir = kernel_dir()
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources():
            rel = src.relative_to(kdir)
            out = Path(tmp) / (str(rel.with_suffix(".o")).replace(os.sep, "_"))
            cmd = [exe, *NVCC_OPTIONS, f"-I{kdir}", "-c", str(src), "-o", str(out)]
            if verbose:
                cmd += ["-Xptxas", "-v"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            status = "ok" if res.returncode == 0 else "FAILED"
            print(f"{rel}: {status}")
            if res.returncode != 0 or verbose:
                sys.stderr.write(res.stdout + res.stderr)
            failed += res.returncode != 0
    return failed


def main(argv: list[str] | None = None) -> int:
    """CLI: ``--nvcc`` compiles every kernel with nvcc for sm_90."""
    parser = argparse.ArgumentParser(prog="python -m tierstore.kernel_loader", description=__doc__)
    parser.add_argument("--nvcc", action="store_true", help="compile every .cu with nvcc (sm_90)")
    parser.add_argument("--nvcc-path", default="nvcc", help="the nvcc executable")
    parser.add_argument("-v", "--verbose", action="store_true", help="print ptxas resource use")
    args = parser.parse_args(argv)
    if not args.nvcc:
        parser.print_help()
        return 0
    return 1 if compile_all_with_nvcc(args.nvcc_path, args.verbose) else 0


if __name__ == "__main__":
    sys.exit(main())
