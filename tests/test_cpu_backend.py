"""The fused CPU kernel ("cpu" backend) against the float64 reference, on every micro-kernel path this CPU runs
(AVX-512, AVX2 + FMA, portable; the smaller paths are forced through LATENTFLOW_CPU_ISA on bigger CPUs).

Differential sweeps use the shared seeded cases of tests/op_cases.py; the rest checks the contract's
bitwise properties (determinism, batch invariance, thread-count invariance), the all-masked rules and
the custom op's registration (opcheck, torch.compile).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import platform
import shutil
import sys
from pathlib import Path

import pytest
import torch

from latentflow_fast.ops import CAPTURE_NAMES, build_plan, probed_attention, unavailable_reason
from latentflow_fast.ops import backend_cpu
from latentflow_fast.ops.reference import reference_attention
from op_cases import INTERVENTIONS, check_against_reference, make_case, rel_error

pytestmark = pytest.mark.skipif(unavailable_reason("cpu") is not None, reason=str(unavailable_reason("cpu")))

ISAS = ["avx512", "avx2", "generic"]


def _supported(name: str) -> bool:
    return unavailable_reason("cpu") is None and name in backend_cpu.supported_isas()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if not _supported(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} path")
    monkeypatch.setenv(backend_cpu.ISA_ENV, request.param)
    return request.param


@pytest.fixture(autouse=True)
def _two_threads(monkeypatch):
    # every call of these small cases runs on two kernel threads (kernel_threads would give small calls one)
    monkeypatch.setattr(backend_cpu, "MIN_WORK_PER_THREAD", {"openmp": 1, "threads": 1})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_kernel_threads_follow_the_parallel_runtime(monkeypatch):
    """The kernels share torch's OpenMP pool in the process that loaded it (one libgomp: the soname torch
    ships); only threads started per call (a forked child, a build without OpenMP) wait for big calls."""
    assert backend_cpu.parallel_runtime() in ("openmp", "threads")
    maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
    if backend_cpu.parallel_runtime() == "openmp" and maps:
        gomp = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line}
        assert len(gomp) == 1, f"more than one OpenMP runtime loaded: {gomp}"
    monkeypatch.setattr(backend_cpu, "MIN_WORK_PER_THREAD", {"openmp": 256 << 10, "threads": 32 << 20})
    monkeypatch.setattr(backend_cpu, "parallel_runtime", lambda: "threads")
    g = torch.Generator().manual_seed(0)
    small = build_plan(*(torch.randn(1, 4, 200, 64, generator=g) for _ in range(3)))  # 20M multiply-adds
    large = build_plan(*(torch.randn(4, 4, 200, 64, generator=g).expand(4, 4, 200, 64) for _ in range(3)))
    assert backend_cpu.kernel_threads(small) == 1
    assert backend_cpu.kernel_threads(large) == 2  # 82M: two threads, capped by torch's count
    torch.set_num_threads(1)
    assert backend_cpu.kernel_threads(large) == 1


def test_pool_setting_is_checked_and_switches_the_thread_source(monkeypatch):
    g = torch.Generator().manual_seed(6)
    plan = build_plan(*(torch.randn(1, 4, 70, 16, generator=g) for _ in range(3)), capture=("entropy",))
    pooled, caps = backend_cpu.run(plan)
    monkeypatch.setenv(backend_cpu.POOL_ENV, "threads")
    assert backend_cpu.parallel_runtime() == "threads"
    started, caps_started = backend_cpu.run(plan)
    assert torch.equal(pooled, started) and torch.equal(caps["entropy"], caps_started["entropy"])
    monkeypatch.setenv(backend_cpu.POOL_ENV, "Thread")
    with pytest.raises(ValueError, match="LATENTFLOW_CPU_POOL"):
        backend_cpu.run(plan)


def _forked_child(queue, q, k, v, expected):
    torch.set_num_threads(1)  # torch's own ops would wait on the dead pool too (as in any forked torch child)
    backend_cpu.kernel_threads = lambda plan: 2  # the kernel still asks for two threads
    out, _ = backend_cpu.run(build_plan(q, k, v))
    queue.put((backend_cpu.parallel_runtime(), bool(torch.equal(out, expected))))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_runs_the_kernel_on_threads_of_its_own():
    """libgomp's pool does not survive fork: a child of a process that used it must not wait on it (a hang)
    but start its own threads, with the same bits."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 200, 64, generator=g) for _ in range(3))
    expected, _ = backend_cpu.run(build_plan(q, k, v))  # two threads: the parent's pool is in use
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_forked_child, args=(queue, q, k, v, expected))
    child.start()
    child.join(120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in the CPU kernel")
    assert child.exitcode == 0
    assert queue.get(timeout=10) == ("threads", True)


# ---------------------------------------------------------------------------------------------- sweeps


@pytest.mark.parametrize("block", range(8))
def test_random_float32(isa, block):
    for seed in range(block * 15, block * 15 + 15):
        check_against_reference(make_case(seed, torch.float32, max_n=150), "cpu")


@pytest.mark.parametrize("block", range(4))
def test_random_bfloat16(isa, block):
    for seed in range(1000 + block * 15, 1000 + block * 15 + 15):
        check_against_reference(make_case(seed, torch.bfloat16, max_n=150), "cpu")


def test_random_float16(isa):
    for seed in range(2000, 2015):
        check_against_reference(make_case(seed, torch.float16, max_n=150), "cpu")


@pytest.mark.parametrize("seed", range(6))
def test_larger_shapes(isa, seed):
    """A few hundred keys and queries: several key tiles and query tiles, partial last tiles."""
    check_against_reference(make_case(3000 + seed, torch.float32, max_n=300, head_dims=(1, 17, 64, 80)), "cpu")


@pytest.mark.parametrize("name", INTERVENTIONS)
def test_each_intervention_alone(isa, name):
    for seed in range(4000, 4012):
        check_against_reference(make_case(seed, interventions=(name,), captures=CAPTURE_NAMES), "cpu")


@pytest.mark.parametrize("name", CAPTURE_NAMES)
def test_each_capture_alone(isa, name):
    for seed in range(5000, 5012):
        check_against_reference(make_case(seed, interventions=(), captures=(name,)), "cpu")


def test_everything_combined(isa):
    for seed in range(6000, 6020):
        for dtype in (torch.float32, torch.bfloat16):
            case = make_case(seed, dtype, max_n=200, interventions=INTERVENTIONS, captures=CAPTURE_NAMES)
            check_against_reference(case, "cpu")


# ------------------------------------------------------------------------------------ targeted cases


def _inputs(B=2, H=4, Hkv=2, Nq=70, Nk=130, D=33, Dv=20, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Nk, Dv, generator=gen).to(dtype)
    return q, k, v, gen


def _compare(q, k, v, dtype_tol=1e-5, **kwargs):
    out, caps = probed_attention(q, k, v, backend="cpu", **kwargs)
    ref_out, ref_caps = reference_attention(build_plan(q, k, v, **kwargs))
    assert rel_error(out, ref_out) <= dtype_tol
    for name, ref in ref_caps.items():
        assert rel_error(caps[name], ref) <= dtype_tol, name
    return out, caps


def test_fully_masked_rows(isa):
    q, k, v, gen = _inputs()
    mask = torch.rand(2, 130, generator=gen) < 0.7
    mask[1] = False  # batch row 1 sees no key at all
    gate = torch.tensor([[1.0, 0.5, 2.0, -1.0]] * 2)
    bias = torch.randn(2, 4, 20, generator=gen)
    out, caps = _compare(q, k, v, key_padding_mask=mask, segments=[0, 50, 130], head_gate=gate, out_bias=bias,
                         capture=CAPTURE_NAMES)
    assert torch.equal(out[1], bias[1][:, None, :].expand(4, 70, 20))
    assert torch.all(caps["lse"][1] == -math.inf) and torch.all(caps["max"][1] == -math.inf)
    assert torch.all(caps["entropy"][1] == 0) and torch.all(caps["segment_mass"][1] == 0)
    assert torch.all(caps["key_mass"][1] == 0)
    assert torch.all(caps["key_mass"][0][:, ~mask[0]] == 0)


def test_segment_knockout_and_uniform(isa):
    q, k, v, _ = _inputs(B=1, H=2, Hkv=1, Nq=5, Nk=100, D=8, Dv=8)
    bias = torch.tensor([[[0.0, -math.inf], [-math.inf, -math.inf]]])
    out, caps = _compare(q, k, v, segments=[0, 37, 100], segment_bias=bias, logit_scale=torch.tensor([[0.0, 1.0]]),
                         capture=CAPTURE_NAMES)
    # head 0: uniform over the 37 keys of segment 0; head 1: every key knocked out
    torch.testing.assert_close(caps["segment_mass"][0, 0], torch.tensor([[1.0, 0.0]] * 5))
    torch.testing.assert_close(caps["entropy"][0, 0], torch.full((5,), math.log(37)))
    torch.testing.assert_close(out[0, 0], v[0, 0, :37].mean(0).expand(5, 8))
    assert torch.all(out[0, 1] == 0) and torch.all(caps["lse"][0, 1] == -math.inf)


def test_single_query_and_key(isa):
    q, k, v, _ = _inputs(B=1, H=1, Hkv=1, Nq=1, Nk=1, D=1, Dv=1)
    out, caps = _compare(q, k, v, capture=CAPTURE_NAMES, segments=[0, 1])
    assert torch.equal(out, v) and caps["entropy"].item() == 0 and caps["key_mass"].item() == 1


def test_patched_or_gated_heads_without_captures(isa):
    """Heads that are patched or gated to 0 skip the attention when nothing is captured."""
    q, k, v, gen = _inputs(H=4, Hkv=4)
    patch = torch.randn(2, 4, 70, 20, generator=gen)
    pm = torch.tensor([[True, False, False, True], [False, True, False, False]])
    gate = torch.tensor([[1.0, 0.0, 1.0, 3.0], [0.0, 1.0, 1.0, 0.5]])
    _compare(q, k, v, out_patch=patch, patch_mask=pm, head_gate=gate, out_bias=torch.ones(4, 20))
    _compare(q, k, v, out_patch=patch.transpose(2, 3).contiguous().transpose(2, 3), patch_mask=pm, head_gate=gate,
             capture=("lse",))


def test_one_segment_per_key(isa):
    """G = Nk: every key tile covers 64 segments (the per-tile segment pieces at their maximum)."""
    q, k, v, gen = _inputs(Nk=130)
    _compare(q, k, v, segments=list(range(131)), segment_bias=torch.randn(2, 4, 130, generator=gen),
             capture=CAPTURE_NAMES)


def test_expanded_and_sliced_inputs(isa):
    """Zero strides (broadcast views), storage offsets and transposed storage."""
    q, k, v, _ = _inputs(B=1, Nq=9, Nk=70, D=16, Dv=16)
    big = torch.randn(3, 4, 20, 40)
    _compare(q.expand(3, -1, -1, -1), k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1).transpose(2, 3)
             .contiguous().transpose(2, 3), capture=("lse", "key_mass"))
    _compare(big[1:2, :, 3:12, 5:21], k, v, out_patch=big[:1, :, :9, 20:36], patch_mask=torch.tensor([True, False] * 2))


def test_several_kv_head_chunks(isa):
    """Long keys: the packed K/V of all kv heads exceed the kernel's chunk budget (8 MiB), so the (b, kv head)
    pairs run in several chunks through one reused buffer; GQA heads and key_mass must still line up."""
    q, k, v, gen = _inputs(B=2, H=6, Hkv=3, Nq=9, Nk=8200, D=64, Dv=64)
    mask = torch.rand(2, 8200, generator=gen) < 0.9
    ls = torch.rand(2, 6, generator=gen) + 0.5
    kwargs = dict(segments=[0, 100, 8199, 8200], capture=CAPTURE_NAMES)
    out, caps = _compare(q, k, v, key_padding_mask=mask, logit_scale=ls, **kwargs)
    alone = probed_attention(q[1:], k[1:], v[1:], backend="cpu", key_padding_mask=mask[1:], logit_scale=ls[1:], **kwargs)
    _assert_bitwise(alone, (out[1:], {name: t[1:] for name, t in caps.items()}))


def test_bfloat16_large_logits(isa):
    q, k, v, _ = _inputs(dtype=torch.bfloat16)
    _compare(q * 4, k, v, dtype_tol=2e-2, capture=CAPTURE_NAMES, segments=[0, 64, 65, 130])


# --------------------------------------------------------------------------------- bitwise properties


def _all_args(B, seed):
    q, k, v, gen = _inputs(B=B, H=4, Hkv=2, Nq=150, Nk=200, D=40, Dv=24, seed=seed)
    mask = torch.rand(B, 200, generator=gen) < 0.8
    mask[3 % B] = False
    kwargs = dict(
        key_padding_mask=mask, segments=[0, 30, 64, 128, 199, 200],
        logit_scale=torch.rand(B, 4, generator=gen) * 2, segment_bias=torch.randn(B, 4, 5, generator=gen),
        head_gate=torch.randn(B, 4, generator=gen), out_bias=torch.randn(B, 4, 24, generator=gen),
        out_patch=torch.randn(B, 4, 150, 24, generator=gen), patch_mask=torch.rand(B, 4, generator=gen) < 0.3,
        capture=CAPTURE_NAMES,
    )
    return q, k, v, kwargs


def _assert_bitwise(a, b):
    out_a, caps_a = a
    out_b, caps_b = b
    assert torch.equal(out_a, out_b)
    for name in caps_a:
        assert torch.equal(caps_a[name], caps_b[name]), name


def test_determinism(isa):
    q, k, v, kwargs = _all_args(4, seed=1)
    _assert_bitwise(probed_attention(q, k, v, backend="cpu", **kwargs),
                    probed_attention(q, k, v, backend="cpu", **kwargs))


def test_batch_invariance(isa):
    """Row b computed inside a batch of 16 different rows equals row b computed alone, bitwise."""
    q, k, v, kwargs = _all_args(16, seed=2)
    out, caps = probed_attention(q, k, v, backend="cpu", **kwargs)
    for b in (0, 3, 11):
        row = {name: (val[b : b + 1] if isinstance(val, torch.Tensor) else val) for name, val in kwargs.items()}
        out_b, caps_b = probed_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], backend="cpu", **row)
        assert torch.equal(out_b, out[b : b + 1])
        for name in caps:
            assert torch.equal(caps_b[name], caps[name][b : b + 1]), name


def test_thread_count_invariance(isa):
    q, k, v, kwargs = _all_args(3, seed=3)
    torch.set_num_threads(1)
    one = probed_attention(q, k, v, backend="cpu", **kwargs)
    torch.set_num_threads(2)
    _assert_bitwise(one, probed_attention(q, k, v, backend="cpu", **kwargs))


def test_concurrent_python_threads(isa):
    """The kernel releases the GIL: calls from several Python threads at once give the sequential results."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [_all_args(2, seed=10 + i) for i in range(4)]
    sequential = [probed_attention(q, k, v, backend="cpu", **kw) for q, k, v, kw in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda job: probed_attention(*job[:3], backend="cpu", **job[3]), jobs))
    for a, b in zip(sequential, concurrent):
        _assert_bitwise(a, b)


# ------------------------------------------------------------------------------------- registration


def test_auto_picks_cpu_for_cpu_tensors():
    from latentflow_fast.ops.backends import choose_backend

    q, k, v, _ = _inputs()
    assert choose_backend(build_plan(q, k, v)) == "cpu"


def test_opcheck():
    q, k, v, kwargs = _all_args(2, seed=4)
    plan = build_plan(q, k, v, **kwargs)
    args = (plan.q, plan.k, plan.v, plan.key_padding_mask, plan.scale, plan.segments, plan.logit_scale,
            plan.segment_bias, plan.head_gate, plan.out_bias, plan.out_patch, plan.patch_mask,
            [n in plan.capture for n in CAPTURE_NAMES], "cpu")
    torch.library.opcheck(torch.ops.latentflow.probed_attention.default, args)


def test_eager_calls_skip_the_dispatcher_with_the_same_results(monkeypatch):
    """Plain eager calls without gradients run the backend directly (probed_attention._eager_plain); the
    result is bitwise the custom op's, and calls needing gradients still go through the op."""
    import importlib

    module = importlib.import_module("latentflow_fast.ops.probed_attention")  # the name is also the function's
    q, k, v, kwargs = _all_args(2, seed=6)
    plan = build_plan(q, k, v, **kwargs)
    flags = [n in plan.capture for n in CAPTURE_NAMES]
    via_op = torch.ops.latentflow.probed_attention.default(
        plan.q, plan.k, plan.v, plan.key_padding_mask, plan.scale, plan.segments, plan.logit_scale,
        plan.segment_bias, plan.head_gate, plan.out_bias, plan.out_patch, plan.patch_mask, flags, "cpu")
    calls = []
    op = module._probed_attention_op
    monkeypatch.setattr(module, "_probed_attention_op", lambda *a: calls.append(1) or op(*a))
    out, caps = probed_attention(q, k, v, backend="cpu", **kwargs)
    assert not calls  # the dispatcher was skipped
    assert torch.equal(out, via_op[0])
    assert caps.keys() == set(plan.capture)
    for name in plan.capture:
        assert torch.equal(caps[name], via_op[1 + CAPTURE_NAMES.index(name)])
    out_grad, _ = probed_attention(q.clone().requires_grad_(), k, v, backend="cpu", **kwargs)
    assert calls and out_grad.grad_fn is not None and torch.equal(out_grad.detach(), out)


def test_torch_compile():
    q, k, v, kwargs = _all_args(2, seed=5)

    def probe(q, k, v):
        out, caps = probed_attention(q, k, v, backend="cpu", **kwargs)
        return out * 2, caps["entropy"] + 1

    # Not fullgraph: backend resolution (importlib in ops/backends.py) is a graph break under dynamo.
    compiled = torch.compile(probe, backend="aot_eager")  # inductor adds ~40 s of compile here
    eager_out, eager_ent = probe(q, k, v)
    out, ent = compiled(q, k, v)
    assert torch.equal(out, eager_out) and torch.equal(ent, eager_ent)


# ------------------------------------------------------------------------------------- ISA selection


def test_auto_runs_the_best_path(monkeypatch):
    """Unset / "auto" resolves to the best path of this CPU, and gives that path's results bitwise."""
    monkeypatch.delenv(backend_cpu.ISA_ENV, raising=False)
    best = backend_cpu.supported_isas()[0]
    info = backend_cpu.cpu_info()
    assert info["isa"] == best and info["requested"] == "auto" and info["supported"][-1] == "generic"
    q, k, v, kwargs = _all_args(2, seed=6)
    auto = probed_attention(q, k, v, backend="cpu", **kwargs)
    monkeypatch.setenv(backend_cpu.ISA_ENV, best)
    assert backend_cpu.cpu_info()["isa"] == best
    _assert_bitwise(auto, probed_attention(q, k, v, backend="cpu", **kwargs))


def test_cpu_info_follows_the_forced_path(isa):
    info = backend_cpu.cpu_info()
    assert info["isa"] == isa and info["requested"] == isa


def test_paths_agree_with_each_other():
    """Every path this CPU runs gives the same result up to float32 rounding (not bitwise: exp and sums
    differ in order), on inputs with every capture and intervention."""
    q, k, v, kwargs = _all_args(2, seed=7)
    results = {}
    for name in backend_cpu.supported_isas():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(backend_cpu.ISA_ENV, name)
            results[name] = probed_attention(q, k, v, backend="cpu", **kwargs)
    ref_out, ref_caps = reference_attention(build_plan(q, k, v, **kwargs))
    first_out, first_caps = results[backend_cpu.supported_isas()[0]]
    for name, (out, caps) in results.items():
        assert rel_error(out, ref_out) <= 1e-5, name
        assert rel_error(out, first_out) <= 2e-6, name
        for cap in caps:
            assert rel_error(caps[cap], ref_caps[cap]) <= 1e-5, (name, cap)
            assert rel_error(caps[cap], first_caps[cap]) <= 2e-6, (name, cap)


def test_unknown_isa_name(monkeypatch):
    q, k, v, _ = _inputs()
    monkeypatch.setenv(backend_cpu.ISA_ENV, "avx9000")
    with pytest.raises(ValueError, match="LATENTFLOW_CPU_ISA"):
        probed_attention(q, k, v, backend="cpu")
    with pytest.raises(ValueError, match="LATENTFLOW_CPU_ISA"):
        backend_cpu.cpu_info()


@pytest.mark.parametrize("name, probe", [("avx512", "has_avx512"), ("avx2", "has_avx2")])
def test_forcing_a_path_the_cpu_lacks(monkeypatch, name, probe):
    """On a CPU without the instructions (simulated: the CPUID answer patched to False) forcing the path is
    a clear ValueError, not an illegal instruction."""
    q, k, v, _ = _inputs()
    monkeypatch.setattr(backend_cpu, probe, lambda: False)
    monkeypatch.setenv(backend_cpu.ISA_ENV, name)
    with pytest.raises(ValueError, match=f"{name} but this CPU has no"):
        probed_attention(q, k, v, backend="cpu")


def test_native_isa_codes():
    """The native side resolves the path itself too (it never trusts the caller) and refuses bad codes."""
    native = backend_cpu._native()
    assert native.cpu_resolve_isa(2) == "generic"
    assert native.cpu_resolve_isa(0) == backend_cpu.supported_isas()[0]
    for code, name in ((1, "avx512"), (3, "avx2")):
        if name in backend_cpu.supported_isas():
            assert native.cpu_resolve_isa(code) == name
        else:
            with pytest.raises(ValueError, match="this CPU has no"):
                native.cpu_resolve_isa(code)
    with pytest.raises(ValueError, match="isa must be"):
        native.cpu_resolve_isa(7)


QEMU = shutil.which("qemu-x86_64")


@pytest.mark.skipif(platform.machine() != "x86_64" or QEMU is None, reason="needs x86-64 and qemu-user (qemu-x86_64)")
@pytest.mark.parametrize("cpu_model, expected", [("Nehalem", "generic"), ("Haswell", "avx2")])
def test_one_binary_runs_on_older_x86_cpus(cpu_model, expected):
    """The built extension, run under qemu emulating a CPU without AVX (Nehalem) and one with AVX2 + FMA but
    no AVX-512 (Haswell): auto picks the right path, forcing a missing one is a ValueError, and the results
    match a float64 reference. A functional check only (emulated timing means nothing)."""
    import subprocess

    script = Path(__file__).with_name("cpu_isa_check.py")
    so = backend_cpu._native().__file__
    run = subprocess.run([QEMU, "-cpu", cpu_model, sys.executable, str(script), so, expected],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr


AARCH64_CXX, QEMU_AARCH64 = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")


@pytest.mark.skipif(AARCH64_CXX is None or QEMU_AARCH64 is None,
                    reason="needs an aarch64 cross compiler (aarch64-linux-gnu-g++) and qemu-user (qemu-aarch64)")
def test_portable_path_on_aarch64_under_qemu(tmp_path):
    """What non-x86 users get: the native core cross-compiled for aarch64 (the portable path, vectorised for
    NEON) runs under qemu and matches a float64 reference. Functional only."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "cpu_kernel_check"
    sources = sorted(str(p) for p in (root / "csrc").glob("*.cpp"))
    build = subprocess.run([AARCH64_CXX, "-O3", "-std=gnu++17", "-static", "-pthread", f"-I{root / 'csrc'}",
                            str(root / "tests" / "cpu_kernel_check.cpp"), *sources, "-o", str(exe)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([QEMU_AARCH64, str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "auto -> generic" in run.stdout and "OK" in run.stdout, run.stdout + run.stderr


@pytest.mark.parametrize("Nk", [70, 300])
def test_one_segment_per_key(Nk):
    # Any G the contract allows, G = Nk included (one segment per key).
    from op_cases import assert_matches_reference

    q, k, v, gen = _inputs(Nq=33, Nk=Nk, D=16, Dv=16, seed=Nk)
    bias = torch.randn(2, 4, Nk, generator=gen)
    bias[:, :, ::5] = -math.inf
    kwargs = dict(segments=list(range(Nk + 1)), segment_bias=bias, capture=CAPTURE_NAMES)
    out, caps = probed_attention(q, k, v, backend="cpu", **kwargs)
    ref_out, ref_caps = reference_attention(build_plan(q, k, v, **kwargs), torch.float64)
    assert_matches_reference({"out": out, **caps}, {"out": ref_out, **ref_caps}, torch.float32)
