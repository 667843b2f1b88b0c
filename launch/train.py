"""Train a policy with DPO on DeepSpeed.

    deepspeed --num_gpus 2 launch/train.py                                   # the built-in tiny task
    deepspeed --num_gpus 8 launch/train.py --config run.yaml --beta 0.2     # your model and data
    deepspeed --hostfile hosts launch/train.py --config run.yaml            # several nodes

Any config key can be given as ``--key value`` (docs/configuration.md); they override the YAML.
Exit status: 0 finished or preempted (checkpoint saved), 1 stopped on non-finite steps, 2 bad config or data,
3 a checkpoint could not be written or read back (a full disk, a damaged checkpoint; the message says which).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ds_dpo.config import ConfigError, load_config  # noqa: E402
from ds_dpo.data.pipeline import DataError  # noqa: E402


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(argv)
        cfg.validate()
    except ConfigError as e:
        print(f"ds_dpo: {e}", file=sys.stderr)
        return 2

    import torch

    from ds_dpo.training.checkpoint import CheckpointError
    from ds_dpo.training.recipe import DPORecipe

    recipe, completed = DPORecipe(cfg), False
    try:
        recipe.setup()
        result = recipe.train()
        if result.status == "finished":
            recipe.save()
        completed = True
    except (ConfigError, DataError) as e:
        print(f"ds_dpo: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"ds_dpo: {e}", file=sys.stderr)
        return 3
    finally:
        recipe.cleanup(completed)
        # Explicitly: left to interpreter exit, gloo's threads can abort a rank after a successful run.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if result.status == "non_finite":
        print(f"ds_dpo: {result.message}", file=sys.stderr)
        return 1
    if recipe.rank != 0:
        return 0
    if result.status == "preempted":
        print(
            f"ds_dpo: stopped by a signal at step {result.step}; checkpoint saved under {cfg.output_dir}/"
            "checkpoints. Resume with the same command plus --resume_from_checkpoint auto"
        )
    elif result.eval_metrics:
        print(
            f"held-out reward accuracy: {result.eval_metrics['eval_rewards/accuracies']:.4f} "
            f"(eval loss {result.eval_metrics['eval_loss']:.4f}); model saved to {cfg.output_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
