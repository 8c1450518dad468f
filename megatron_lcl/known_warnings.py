"""The warnings megatron-core (0.16.1, 0.19.2) and torch give that are known and understood here, filtered by
the package's `__init__` before anything imports megatron-core (several come at its import).

Each is filtered by the start of its message (never a whole category), so a new deprecation at the next
upgrade still shows. It belongs with the version adaptations in `runtime/mcore_compat.py`, but lives
beside `stop_signals.py` for the same reason as it: it imports only the standard library, so that
`import megatron_lcl` (the first line of `python -m megatron_lcl.train`) imports neither torch nor
megatron-core.
"""

import warnings

# (message regex, category); the regexes contain no ':' so that pytest.ini-style filters can carry them
# too (tests/conftest.py).
KNOWN_WARNINGS = (
    # CPU / no Apex or Transformer Engine: megatron-core (0.16.1) says it falls back to torch, as intended.
    (r"Transformer Engine and Apex are not installed", UserWarning),
    (r"Apex is not installed", UserWarning),
    # megatron-core 0.16.1 warns on its own import (inference contexts, multi-latent attention, jit).
    (r"The following imports from `dynamic_context.py` will be removed", DeprecationWarning),
    (r"The 'megatron.core.transformer.custom_layers.transformer_engine'", DeprecationWarning),
    (r"`torch.jit.script_method` is deprecated", DeprecationWarning),
    # megatron-core 0.16.1 defaults, not our settings: TransformerConfig's cuda_graph_scope default and
    # the MLP submodule spec. Upgrade check: drop these when the defaults stop warning.
    (r"full scope is deprecated", UserWarning),
    (r"MLP requires ffn_hidden_size, but it was not provided", DeprecationWarning),
    # megatron-core 0.16.1 dist-checkpointing calls torch.distributed.checkpoint APIs torch deprecates.
    (r"`load_state_dict` is deprecated and will be removed in future versions", FutureWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
    # megatron-core 0.16.1's distributed optimizer and sequence-parallel mappings call the collectives
    # torch 2.13 renames. Upgrade check: gone when megatron-core calls the *_single names.
    (r"`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning),
    (r"`torch.distributed.reduce_scatter_tensor` is deprecated", FutureWarning),
    # megatron-core 0.16.1 layers read the TP group from parallel_state when none is passed; "will be
    # mandatory soon". Upgrade check: pass `tp_group` (from ParallelLayout) when this becomes an error.
    (r"Warning. tp_group is None, using default tp group", DeprecationWarning),
    # megatron-core 0.19.2: at its import (an experimental multi-modal config class), and its load of a
    # checkpoint's common state (`load_common_state_dict`: torch.distributed.checkpoint.load with
    # no_dist=True, on every rank).
    (r"MimoModelConfig is experimental", UserWarning),
    (r"torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a "
     r"single process", UserWarning),
    (r"The argument order of load has been changed", UserWarning),
)


def filter_known_warnings() -> None:
    """Silence the warnings in KNOWN_WARNINGS (and only those). Idempotent."""
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
