"""The duplicate-caption rule of retrieval recall (retrieve.correct_pairs / retrieval_ranks): without it
an image whose caption another image shares can never be a TR@1 hit for both (the ceiling the old
scaling study's TR@1 hit); with it identical captions are interchangeable. Also the per-item rows the
transfer evaluation writes for paired comparisons."""

import pytest
import torch

from megatron_lcl.eval.retrieve import correct_pairs, recall_at_k, retrieval_ranks
from megatron_lcl.eval.transfer import per_item_rows

CAPTIONS = ["A red circle.", "a  red circle.", "A blue square."]  # texts 0 and 1 are the same caption


def test_identical_captions_match_each_other():
    correct = correct_pairs(torch.arange(3), 3, CAPTIONS)
    assert correct.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    assert correct_pairs(torch.arange(3), 3).tolist() == torch.eye(3, dtype=torch.bool).tolist()


def test_tie_rule_counts_a_shared_caption_as_a_hit():
    # a perfect encoder for what the captions say cannot tell images 0 and 1 apart: equal rows and columns
    sim = torch.tensor([[0.9, 0.9, 0.1],
                        [0.9, 0.9, 0.1],
                        [0.1, 0.1, 0.8]])
    strict = recall_at_k(sim, torch.arange(3), ks=(1, 2))
    # own captions only: images 0 and 1 each see the other's (identical) caption score >= their own
    assert strict == pytest.approx({"TR@1": 100 / 3, "TR@2": 100.0, "IR@1": 100 / 3, "IR@2": 100.0})
    ties = recall_at_k(sim, torch.arange(3), ks=(1, 2), captions=CAPTIONS)
    assert ties == pytest.approx({"TR@1": 100.0, "TR@2": 100.0, "IR@1": 100.0, "IR@2": 100.0})


def test_tie_rule_still_ranks_wrong_captions_and_score_ties_against_the_model():
    sim = torch.tensor([[0.2, 0.3, 0.5],   # image 0: the wrong caption (text 2) first
                        [0.4, 0.1, 0.4],   # image 1: text 0 (same caption) ties text 2: a tie in score
                        [0.1, 0.1, 0.9]])
    image_rank, text_rank = retrieval_ranks(sim, torch.arange(3), CAPTIONS)
    assert image_rank.tolist() == [1, 1, 0]  # equal scores count against the model, as without the rule
    # text 0: its best correct image is 1 (0.4) and ties with no wrong one (image 2: 0.1) -> 0;
    # text 1: best correct 0.3 (image 0) -> 0; text 2: image 2 (0.9) above every other -> 0
    assert text_rank.tolist() == [0, 0, 0]
    # a collapsed encoder still scores 0 at k < the number of distinct captions
    image_rank, text_rank = retrieval_ranks(torch.ones(3, 3), torch.arange(3), CAPTIONS)
    # image 2's wrong candidates are one distinct caption (texts 0 and 1); text 2's are two images
    assert image_rank.tolist() == [1, 1, 1] and text_rank.tolist() == [1, 1, 2]


def test_a_repeated_wrong_caption_is_one_candidate():
    # image 0 (caption "a red circle.") prefers "a blue square.", which three other images also have
    captions = ["A red circle.", "A blue square.", "A blue square.", "A blue square.", "A green cross."]
    sim = torch.tensor([[0.5, 0.9, 0.9, 0.9, 0.1]] + [[0.0, 0.9, 0.9, 0.9, 0.0]] * 3 + [[0.0, 0.0, 0.0, 0.0, 1.0]])
    image_rank, _ = retrieval_ranks(sim, torch.arange(5), captions)
    assert image_rank[0] == 1  # one wrong caption above, not three texts
    assert recall_at_k(sim, torch.arange(5), ks=(1, 2), captions=captions)["TR@2"] == 100.0
    assert recall_at_k(sim, torch.arange(5), ks=(2,))["TR@2"] < 100.0  # own captions only: texts count


def test_per_item_rows_join_tasks_by_item():
    details = {"classify_count": {"per_item": {"image": ["b.jpg", "a.jpg"], "correct": [1, 0]}},
               "retrieval": {"per_item": {"image": ["a.jpg", "b.jpg", "c.jpg"], "tr_rank": [0, 3, 1],
                                          "ir_rank": [2, 0, 0]}},
               "classify_object_b": {"accuracy_pct": {"acc-1": 50.0}}}  # an older result without per_item
    assert per_item_rows(details) == [
        {"item": "a.jpg", "probe_count": 0, "tr_rank": 0, "ir_rank": 2},
        {"item": "b.jpg", "probe_count": 1, "tr_rank": 3, "ir_rank": 0},
        {"item": "c.jpg", "tr_rank": 1, "ir_rank": 0}]
