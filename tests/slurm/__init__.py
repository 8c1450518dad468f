"""A throw-away one-node slurm cluster for tests/test_slurm.py (cluster.py)."""
