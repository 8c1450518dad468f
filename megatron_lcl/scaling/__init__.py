"""Scaling-law tooling: power-law fits (`fit`) and sweeps over model sizes and compute budgets (`sweep`),
on the FLOPs/parameter model of `megatron_lcl.models.flops`. See tools/sweep.py and tools/scaling_report.py."""
