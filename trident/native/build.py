"""Compile trident's C kernels for this CPU on first use and load them with ctypes.

A library (LIBRARIES: its name and C sources in this folder) is compiled with the system C compiler (``$CC``,
else ``cc``) for the CPU it runs on (``-march=native``: AVX2, AVX-512 VNNI or AVX-VNNI where present; tests also
build other levels) and with OpenMP. The shared library is cached
under ``$TRIDENT_CACHE_DIR`` (default ``~/.cache/trident``) in ``native/``, named by a hash of the sources, the
flags, the compiler's version and the CPU's model and flags, so an edited source, another compiler or another CPU
builds anew and a stale library is never loaded. Compiling writes to a temporary file renamed into place, so
concurrent processes (pytest workers) never load a half-written library.

Nothing here is needed for correctness: callers use :func:`load` and keep their torch path when it returns None
(no compiler, a failed build), with :func:`unavailable_reason` saying why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from trident.cache import cache_dir as trident_cache_dir
from trident.errors import TridentError

SOURCE_DIR = Path(__file__).parent
LIBRARIES = {"tqnative": ("qmatmul.c", "decode_layer.c")}
"""Library name -> its C sources (trident/native/qmatmul.c: the integer dot-product matmul; decode_layer.c: a
decoder layer's decode step around it)."""
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-Wall", "-Werror")
NATIVE = "native"
"""The -march the libraries are built for: this CPU. Tests also build x86-64-v3 (AVX2, the CI machine's level) and
x86-64 (no vector extensions: the plain C path) to check every path on one machine."""
DISABLE_ENV = "TRIDENT_NO_NATIVE"
"""Set to 1 to keep every caller on its torch path (for comparisons and for debugging)."""


def cache_dir() -> Path:
    return trident_cache_dir("native")


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _cpu_signature() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


@functools.cache
def _build(name: str, march: str) -> tuple[ctypes.CDLL | None, str | None]:
    if name not in LIBRARIES:
        raise TridentError(f"no native library {name!r}; have {', '.join(LIBRARIES)}")
    sources = [SOURCE_DIR / file for file in LIBRARIES[name]]
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler (cc or gcc) on PATH"
    version, why = tool_version(compiler)
    if version is None:
        return None, why
    flags = (*FLAGS, f"-march={march}")
    library = cached_library_path(f"{name}-{march}", sources, "*.h", flags, version, _cpu_signature())
    import torch  # noqa: F401  (its libgomp is loaded first, so the library shares torch's OpenMP runtime)

    return compile_cached(name, library, lambda out: [compiler, *flags, *map(str, sources), "-o", out, "-lm"])


def cached_library_path(stem: str, sources: list[Path], headers: str, flags: tuple[str, ...],
                        *facts: str) -> Path:
    """Where a library built from ``sources`` (and every header of the folder matching ``headers``) with
    ``flags`` is cached: named by a hash of their texts, the flags and ``facts`` (the compiler's version, ...)."""
    texts = [path.read_text() for path in (*sources, *sorted(SOURCE_DIR.glob(headers)))]
    key = hashlib.sha256("\0".join((*texts, " ".join(flags), *facts)).encode())
    return cache_dir() / f"{stem}-{key.hexdigest()[:16]}.so"


def tool_version(tool: str) -> tuple[str | None, str | None]:
    """(``tool --version``'s output, None), or (None, why it failed): part of a build's cache key."""
    try:
        return subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout, None
    except (OSError, subprocess.CalledProcessError) as e:
        return None, f"{tool} --version failed: {e}"


def compile_cached(name: str, library: Path,
                   command: Callable[[str], list[str]]) -> tuple[ctypes.CDLL | None, str | None]:
    """Load the shared library at ``library`` (a cache path named by a hash of everything that makes it), compiling
    it first by ``command(output path)`` when it is not there: into a temporary file renamed into place, so that
    concurrent processes (pytest workers) never load a half-written one. (None, why) when that fails."""
    if not library.is_file():
        library.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=library.parent)
        os.close(fd)
        try:
            done = subprocess.run(command(tmp), capture_output=True, text=True)
            if done.returncode != 0:
                return None, f"compiling {name} failed: {done.stderr.strip()[-2000:]}"
            os.replace(tmp, library)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        return ctypes.CDLL(str(library)), None
    except OSError as e:
        return None, f"loading {library} failed: {e}"


def load(name: str, march: str = NATIVE) -> ctypes.CDLL | None:
    """The compiled library ``name`` of LIBRARIES for ``-march=march`` (built on first use), or None where it
    cannot be or ``$TRIDENT_NO_NATIVE`` is 1."""
    return None if os.environ.get(DISABLE_ENV) == "1" else _build(name, march)[0]


def unavailable_reason(name: str, march: str = NATIVE) -> str | None:
    """Why :func:`load` gives None (None when it gives the library)."""
    return f"{DISABLE_ENV}=1" if os.environ.get(DISABLE_ENV) == "1" else _build(name, march)[1]
