"""LCL losses: L = L_gen + lambda * L_con, each returned as a named term (L_con: InfoNCE or the sigmoid ring)."""

from megatron_lcl.losses.contrastive import contrastive_loss_sum, gather_rows
from megatron_lcl.losses.generation import generation_loss_sum
from megatron_lcl.losses.lcl import LCLLoss, LossTerms, MicroBatchCounts, StepCounts
from megatron_lcl.losses.sigmoid import sigmoid_loss_sum

__all__ = ["LCLLoss", "LossTerms", "MicroBatchCounts", "StepCounts", "contrastive_loss_sum", "gather_rows",
           "generation_loss_sum", "sigmoid_loss_sum"]
