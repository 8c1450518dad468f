"""Weighted data blends (`data.path: [w1, path1, w2, path2]`, Megatron's convention): samples follow the
weights, sources are counted, the state resumes exactly (2 DP ranks, with and without workers) and is
refused for other weights or sources."""

import itertools
import math

import pytest

from megatron_lcl.config import DataConfig, load_config
from megatron_lcl.config.validate import config_errors
from megatron_lcl.data.loader import build_loader
from megatron_lcl.data.prepare import prepare
from data_helpers import IMAGE_SIZE, NUM_IMAGE_TOKENS, write_laion_shard
from data_helpers import loader_kwargs, prepared_mmc4, synthetic_mmc4, tokenizer_path  # noqa: F401 (fixtures)
from test_loader import take


def assert_same_batches(a, b):
    """Field by field; `image_labels` is None in a batch without a labelled (synthetic MMC4) image."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("tokens", "labels", "loss_mask", "position_ids", "images", "image_sample_index",
                     "boi_positions", "image_has_context", "image_labels"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None and v is None) or (u is not None and v is not None and u.equal(v)), f"{name} differs"


@pytest.fixture(scope="module")
def prepared_laion(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("laion")
    for i in range(4):
        write_laion_shard(root / f"{i:05d}.tar", 15)
    out = str(root / "laion")
    prepare("laion", [str(root)], out, progress=False)
    return out


def blend_loader(laion, mmc4, weights, *, tokenizer_path, dp_rank=0, dp_size=1, **fields):
    path = [weights[0], laion, weights[1], mmc4]
    data = DataConfig(path=path, tokenizer=tokenizer_path, seq_length=128, seed=7, shuffle_buffer=16,
                      **{"num_workers": 0, "micro_batch_size": 4, **fields})
    return build_loader(data, image_size=IMAGE_SIZE, num_image_tokens=NUM_IMAGE_TOKENS, dp_rank=dp_rank,
                        dp_size=dp_size)


def test_blend_proportions_follow_the_weights(prepared_laion, prepared_mmc4, tokenizer_path):
    """2,000 samples of a 0.3 / 0.7 blend: each source's share within 3 standard errors of its weight,
    and every sample comes from the source it is counted for (by its shard:key origin)."""
    loader = blend_loader(prepared_laion, prepared_mmc4, (3, 7), tokenizer_path=tokenizer_path)
    from_laion = 0
    for _ in itertools.islice(iter(loader), 500):  # 500 batches x 4 = 2,000 samples
        # LAION keys are `<tar stem: digits>_<key>`; synthetic MMC4 keys `<jsonl stem: letters>_<line>`
        from_laion += sum(all(o.split(":")[1][0].isdigit() for o in origins) for origins in loader.last_batch_origins)
    counts = loader.source_counts()
    n = sum(counts.values())
    assert n == 2000 and counts["laion"] == from_laion, counts
    share, weight = from_laion / n, 0.3
    standard_error = math.sqrt(weight * (1 - weight) / n)
    assert abs(share - weight) <= 3 * standard_error, (share, standard_error)


@pytest.mark.parametrize("num_workers, consumed", [(0, 5), (2, 7)])
def test_blend_resumes_exactly_on_two_dp_ranks(prepared_laion, prepared_mmc4, tokenizer_path, num_workers, consumed):
    for rank in range(2):
        def make():
            return blend_loader(prepared_laion, prepared_mmc4, (0.5, 0.5), tokenizer_path=tokenizer_path,
                                dp_rank=rank, dp_size=2, num_workers=num_workers)
        uninterrupted = make()
        expected = take(uninterrupted, consumed + 6)
        first = make()
        assert_same_batches(take(first, consumed), expected[:consumed])
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        assert_same_batches(take(resumed, 6), expected[consumed:])
        assert resumed.source_counts() == uninterrupted.source_counts()  # counters continue from the state
        assert sum(resumed.source_counts().values()) == (consumed + 6) * 4


def test_blend_state_is_refused_for_other_weights_or_sources(prepared_laion, prepared_mmc4, tokenizer_path):
    loader = blend_loader(prepared_laion, prepared_mmc4, (0.5, 0.5), tokenizer_path=tokenizer_path)
    take(loader, 1)
    state = loader.state_dict()
    other = blend_loader(prepared_laion, prepared_mmc4, (0.3, 0.7), tokenizer_path=tokenizer_path)
    with pytest.raises(ValueError, match="blend"):
        other.load_state_dict(state)
    plain = build_loader(DataConfig(path=[prepared_mmc4], tokenizer=tokenizer_path, seq_length=128, micro_batch_size=4,
                                    seed=7, shuffle_buffer=16, num_workers=0),
                         image_size=IMAGE_SIZE, num_image_tokens=NUM_IMAGE_TOKENS)
    assert "blend" not in plain.state_dict()["config"] and plain.source_counts() == {}
    with pytest.raises(ValueError, match="blend"):
        plain.load_state_dict(state)


@pytest.mark.parametrize("path, message", [
    ("[0.5, /a, 0, /b]", "data.path: weight 0.0 of /b must be > 0"),
    ("[/a, 0.5, /b]", "data.path ("),
    ("[1, 2]", "is where a path should follow weight 1.0"),
])
def test_bad_blends_are_config_errors_naming_data_path(path, message):
    cfg = load_config("examples/configs/tiny_cpu.yaml", [f"data.path={path}", "data.tokenizer=t.model"])
    assert any(message in e for e in config_errors(cfg)), config_errors(cfg)


def test_megatron_blend_convention_parses():
    from megatron_lcl.config.run import data_blend

    assert data_blend([0.5, "/data/laion", 0.5, "/data/mmc4"]) == [(0.5, "/data/laion"), (0.5, "/data/mmc4")]
    assert data_blend(["0.25", "/x", "0.75", "/y"]) == [(0.25, "/x"), (0.75, "/y")]  # from the command line
    assert data_blend(["/data/laion", "/data/mmc4"]) is None and data_blend(["/data/one"]) is None
