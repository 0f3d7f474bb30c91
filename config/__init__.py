"""Hydra configs of fusion_bench, shipped in the wheel (found as pkg://fusion_bench_config)."""
