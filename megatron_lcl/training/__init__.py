"""Training: forward/backward steps, the driver, checkpoints, logging."""
