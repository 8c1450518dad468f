"""Scaling-law tooling: the analytic FLOPs/parameter model (`flops`), power-law fits (`fit`) and
sweeps over model sizes and compute budgets (`sweep`). See tools/sweep.py and tools/scaling_report.py."""
