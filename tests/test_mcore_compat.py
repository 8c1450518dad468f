"""The megatron-core version adaptations (runtime/mcore_compat.py) that do not need a training run:
which checkpoint format keeps its common state where, and the one-line refusal of a checkpoint this
megatron-core cannot read. Their use is covered by the checkpoint and model tests, on each supported
version (README "Upgrading megatron-core": `make test` on 0.16.1, `make test-mcore-latest` on 0.19.x)."""

import pickle

import pytest
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from megatron_lcl.runtime import mcore_compat

OLD_FORMAT = Metadata(state_dict_metadata={"model.weight": BytesStorageMetadata()})  # + common.pt
NEW_FORMAT = Metadata(state_dict_metadata={"model.weight": BytesStorageMetadata(),
                                           "common_state/shard_0_1": BytesStorageMetadata()})


def write_index(folder, index: Metadata) -> str:
    """A checkpoint folder holding only its dist-checkpointing index `.metadata` (pickled, as torch writes it)."""
    folder.mkdir()
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(index, f)
    return str(folder)


def test_common_state_location_is_read_from_the_index():
    assert mcore_compat.common_state_in_common_pt(OLD_FORMAT)
    assert not mcore_compat.common_state_in_common_pt(NEW_FORMAT)


def test_a_checkpoint_of_a_newer_format_is_refused_in_one_line_naming_both_versions(tmp_path):
    newer = write_index(tmp_path / "newer", NEW_FORMAT)
    if mcore_compat.MCORE_VERSION.release >= (0, 19):
        mcore_compat.check_loadable(newer)  # its own format
    else:
        with pytest.raises(ValueError) as e:
            mcore_compat.check_loadable(newer)
        message = str(e.value)
        assert "\n" not in message and newer in message
        assert ">= 0.19" in message and f"megatron-core {mcore_compat.MCORE_VERSION}" in message
    mcore_compat.check_loadable(write_index(tmp_path / "older", OLD_FORMAT))  # every version reads it

