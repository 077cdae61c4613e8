"""Build (once per source version) and import the host-emulated CUDA kernels, `latentflow_cuda_emu`.

The module is the real bindings over the real kernel sources, compiled by the host C++ compiler with
cuda_emulation.h force-included (see that header for what the emulation checks and what it cannot).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SOURCES = [
    ROOT / "kernels" / "probed_attention.cu",
    ROOT / "kernels" / "probed_attention_key_mass.cu",
    ROOT / "bindings" / "cuda_bindings.cpp",
    HERE / "emu_module.cpp",
]
HEADERS = [
    ROOT / "kernels" / "probed_attention.cuh",
    ROOT / "kernels" / "probed_attention_device.cuh",
    HERE / "cuda_emulation.h",
]
MODULE = "latentflow_cuda_emu"


def compiler() -> str | None:
    return shutil.which("g++")


def _mutated_sources(out_dir: Path, mutations: dict) -> list[Path]:
    """Copies of the kernel sources in out_dir/src with each `mutations` entry applied:
    {file name: [(old, new), ...]}, every `old` occurring exactly once (else ValueError)."""
    src = out_dir / "src"
    (src / "kernels").mkdir(parents=True, exist_ok=True)
    (src / "bindings").mkdir(parents=True, exist_ok=True)
    copies = {}
    for path in SOURCES[:-1] + HEADERS[:-1]:
        text = path.read_text()
        for old, new in mutations.get(path.name, []):
            if text.count(old) != 1:
                raise ValueError(f"mutation of {path.name}: {old!r} occurs {text.count(old)} times, expected once")
            text = text.replace(old, new)
        copy = src / path.parent.name / path.name
        copy.write_text(text)
        copies[path] = copy
    unknown = set(mutations) - {p.name for p in copies}
    if unknown:
        raise ValueError(f"mutations name unknown files: {sorted(unknown)}")
    return [copies.get(p, p) for p in SOURCES]


def build(build_root: Path | None = None, sanitize: bool = False, mutations: dict | None = None,
          module_name: str = MODULE):
    """Compile if needed and return the imported module (raises RuntimeError with the compiler output).

    sanitize=True builds with AddressSanitizer (the process must preload libasan: see asan_check.py).
    mutations: {source file name: [(old, new), ...]} builds a mutant of the kernels (tests that the
    emulator catches a planted bug); module_name must then differ from the real module's.
    """
    import pybind11

    digest = hashlib.sha256(b"asan" if sanitize else b"")
    for path in SOURCES + HEADERS:
        digest.update(path.read_bytes())
    digest.update(repr(sorted((mutations or {}).items())).encode())
    out_dir = (build_root or ROOT / "build" / "cuda_emulator") / digest.hexdigest()[:16]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = out_dir / f"{module_name}{suffix}"
    if not target.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        sources = _mutated_sources(out_dir, mutations) if mutations else SOURCES
        tmp = out_dir / f"tmp_{module_name}{suffix}"
        cmd = [
            compiler() or "g++", *(["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"] if sanitize else ["-O2"]),
            "-std=c++20", "-shared", "-fPIC", "-pthread",
            "-DLATENTFLOW_EMULATE", "-include", str(HERE / "cuda_emulation.h"),
            *([f"-DLATENTFLOW_EMU_MODULE={module_name}"] if module_name != MODULE else []),
            f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
            "-x", "c++", *map(str, sources), "-o", str(tmp),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"emulator build failed:\n{' '.join(cmd)}\n{result.stderr[-6000:]}")
        tmp.replace(target)
    spec = importlib.util.spec_from_file_location(module_name, target)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    print(build())
