"""Runs the built extension on whatever CPU this process sees, WITHOUT torch (the native core does not link
libtorch), and checks the path "auto" picks and a small result against a float64 numpy reference.

    python tests/cpu_isa_check.py /path/to/_C.so EXPECTED_AUTO_PATH

tests/test_cpu_backend.py runs it under qemu-user with CPU models that lack AVX-512 and AVX2 (where
qemu-x86_64 is installed): a functional check that the one binary imports and runs there.
"""

import importlib.util
import sys

import numpy as np


def main(so_path: str, expected: str) -> None:
    spec = importlib.util.spec_from_file_location("_C", so_path)
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    auto = native.cpu_resolve_isa(0)
    print(f"avx512={native.cpu_has_avx512()} avx2={native.cpu_has_avx2()} auto={auto}")
    assert auto == expected, (auto, expected)
    for code, name, has in ((1, "avx512", native.cpu_has_avx512()), (3, "avx2", native.cpu_has_avx2())):
        try:
            assert native.cpu_resolve_isa(code) == name and has
        except ValueError as exc:
            assert not has and "this CPU has no" in str(exc), exc
    rng = np.random.default_rng(0)
    B, H, N, D = 2, 2, 70, 24
    q, k, v = (rng.standard_normal((B, H, N, D)).astype(np.float32) for _ in range(3))
    strides = [H * N * D, N * D, D, 1]
    s = np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k.astype(np.float64)) * D**-0.5
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    ref_lse = (np.log(p.sum(-1, keepdims=True)) + m)[..., 0]
    ref = (p / p.sum(-1, keepdims=True)) @ v.astype(np.float64)
    for code in (0, 2):  # auto and the portable path
        out = np.empty((B, H, N, D), np.float32)
        lse = np.empty((B, H, N), np.float32)
        native.probed_attention_cpu(
            dtype=0, batch=B, heads=H, kv_heads=H, num_queries=N, num_keys=N, head_dim=D, value_dim=D,
            q=q.ctypes.data, q_strides=strides, k=k.ctypes.data, k_strides=strides, v=v.ctypes.data,
            v_strides=strides, scale=D**-0.5, out=out.ctypes.data, lse=lse.ctypes.data, num_threads=2, isa=code)
        err = max(np.abs(out - ref).max(), np.abs(lse - ref_lse).max())
        print(f"isa code {code}: max abs error {err:.2e}")
        assert err < 1e-5, err
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
