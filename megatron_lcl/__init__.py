"""megatron_lcl: Latent Compression Learning (LCL) pre-training on megatron-core."""

from megatron_lcl.known_warnings import filter_known_warnings

__version__ = "0.4.0.dev0"  # the one place (setup.py reads it)

# Before any module of the package imports megatron-core, several of whose known warnings come at its
# import: modules may then import it at their top.
filter_known_warnings()
