"""GPU tests (skipped without a CUDA device). Run them all, plus compute-sanitizer: tests/gpu/run_all.sh"""
