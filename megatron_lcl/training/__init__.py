"""Training: the `Trainer`, the vision-language pipeline (`pipeline.py`), the optimizer and its LR
schedule (`optim.py`), metrics and preemption signals. The driver is `megatron_lcl.train`."""
