"""TRL 1.16's DPOTrainer as a numerical oracle for ds_dpo's losses.

TRL 1.16 has no standalone loss function: its losses live inside ``DPOTrainer._compute_loss(model, inputs)``, which
calls ``model(..., labels=..., fused_lm_head=True)`` and reads per-token log-probs (and, for WPO,
``log sum_v p_v^2``) from the output. So the oracle is a real ``DPOTrainer`` (built once on a tiny model and dataset)
whose policy and reference are, per call, ``FixedLogProbs`` modules: they return given per-token log-probs as a
leaf tensor, in TRL's own output type, so TRL's loss and its gradient with respect to every token's log-prob can be
read off and compared with ds_dpo fed the same per-token inputs. The trainer's hyperparameters are the attributes
that ``_compute_loss`` reads (``beta``, ``loss_types``, ...), set per call.
"""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from ds_dpo.data import builtin


class FixedLogProbs(torch.nn.Module):
    """Stands in for a causal LM under TRL's fused LM head, returning the given per-token log-probs."""

    def __init__(self, token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor | None = None):
        super().__init__()
        self.token_logps = torch.nn.Parameter(token_logps.clone())
        self.log_sum_sq_probs = log_sum_sq_probs

    def forward(self, input_ids, labels, fused_lm_head=True, **kwargs):
        mask = labels[:, 1:] != -100  # TRL's fused head zeroes every field where the label is ignored
        log_probs = self.token_logps * mask
        zeros = torch.zeros_like(log_probs)
        log_sum_sq = zeros if self.log_sum_sq_probs is None else self.log_sum_sq_probs * mask
        return FusedCausalLMOutput(
            log_probs=log_probs,
            entropy=zeros,
            log_sum_sq_probs=log_sum_sq,
            mean_logits=zeros.detach(),
            is_top1=mask & False,
            label_mask=mask,
        )


def build_trainer(
    model_dir: str, output_dir: str, ref_model=None, rows: list[dict] | None = None, **config
) -> DPOTrainer:
    """A TRL ``DPOTrainer`` of the built-in tokenizer and the model in ``model_dir`` on ``rows`` (default: 4 copies of
    one pair), on CPU in fp32; ``config``: ``DPOConfig`` values."""
    tokenizer = builtin.build_tokenizer()
    rows = rows or [{"prompt": "count up from 3 :", "chosen": " 4 5 6", "rejected": " 2 1 0"}] * 4
    args = DPOConfig(
        **{
            "output_dir": output_dir,
            "report_to": [],
            "per_device_train_batch_size": 2,
            "use_cpu": True,
            "logging_steps": 1,
            "save_strategy": "no",
            "bf16": False,
            **config,
        }
    )
    pairs = Dataset.from_list(rows)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=pairs, processing_class=tokenizer)


def configure(
    trainer: DPOTrainer,
    loss_type="sigmoid",
    loss_weights=None,
    beta=0.1,
    label_smoothing=0.0,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    discopop_tau=0.05,
    use_weighting=False,
    ld_alpha=None,
) -> DPOTrainer:
    """Set the loss hyperparameters that ``DPOTrainer._compute_loss`` reads."""
    trainer.beta = beta
    trainer.loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    trainer.loss_weights = loss_weights or [1.0] * len(trainer.loss_types)
    trainer.label_smoothing = label_smoothing
    trainer.f_divergence_type = f_divergence_type
    trainer.f_alpha_divergence_coef = f_alpha_divergence_coef
    trainer.args.discopop_tau = discopop_tau
    trainer.use_weighting = use_weighting
    trainer.ld_alpha = ld_alpha
    trainer.precompute_ref_logps = False
    return trainer


def trl_loss(
    trainer: DPOTrainer,
    inputs: dict[str, torch.Tensor],
    policy_token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    log_sum_sq_probs: torch.Tensor | None = None,
    **options,
):
    """TRL's loss for the given per-token log-probs [2B, T-1], and its gradient w.r.t. the policy's."""
    configure(trainer, **options)
    policy = FixedLogProbs(policy_token_logps, log_sum_sq_probs)
    trainer.ref_model = FixedLogProbs(ref_token_logps).requires_grad_(False)
    loss = trainer._compute_loss(policy, inputs, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, policy.token_logps)
    return loss.detach(), grad


def trl_token_ids(trainer: DPOTrainer, rows: list[dict], tokenizer) -> list[dict[str, list[int]]]:
    """TRL 1.16's prompt/chosen/rejected ids of ``rows`` tokenized with ``tokenizer`` (its own dataset preparation)."""
    tokenized = trainer._prepare_dataset(Dataset.from_list(rows), tokenizer, trainer.args, "oracle")
    return [{side: row[f"{side}_ids"] for side in ("prompt", "chosen", "rejected")} for row in tokenized]
