"""The GPU dispatch table (backends.GPU_DISPATCH) as a pure function: no GPU needed."""

import torch

from latentflow_fast.ops.backends import GPU_DISPATCH, GpuRule, preferred_gpu_backend


def test_hopper_and_newer_prefer_triton():
    for cc in ((9, 0), (10, 0), (12, 0)):
        assert preferred_gpu_backend(cc, torch.bfloat16, 128, cuda_supported=True) == "triton"


def test_ampere_and_ada_prefer_cuda_where_it_supports_the_plan():
    for cc in ((8, 0), (8, 6), (8, 9)):
        assert preferred_gpu_backend(cc, torch.bfloat16, 64, cuda_supported=True) == "cuda"
        assert preferred_gpu_backend(cc, torch.float32, 64, cuda_supported=False) == "triton"


def test_unlisted_architectures_fall_back_to_triton():
    assert preferred_gpu_backend((7, 5), torch.float16, 64, cuda_supported=True) == "triton"


def test_a_measured_row_changes_the_rule():
    measured = (GpuRule((9, 0), (9, 0), "cuda", dtypes=(torch.float16,), head_dims=(64,), evidence="measured"),
                *GPU_DISPATCH)
    assert preferred_gpu_backend((9, 0), torch.float16, 64, True, table=measured) == "cuda"
    assert preferred_gpu_backend((9, 0), torch.float16, 128, True, table=measured) == "triton"
    assert preferred_gpu_backend((9, 0), torch.bfloat16, 64, True, table=measured) == "triton"
