"""Train a policy with DPO on DeepSpeed.

    deepspeed --num_gpus 2 launch/train.py                                   # the built-in tiny task
    deepspeed --num_gpus 8 launch/train.py --config run.yaml --beta 0.2     # your model and data
    deepspeed --hostfile hosts launch/train.py --config run.yaml            # several nodes

Any config key can be given as ``--key value`` (see ``ds_dpo/config.py``); they override the YAML.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ds_dpo.config import ConfigError, load_config  # noqa: E402
from ds_dpo.data import DataError  # noqa: E402


def finish(recipe, code: int) -> int:
    """Tear the process group down explicitly: left to interpreter exit, gloo's threads can abort a rank
    ("terminate called without an active exception") after a successful run."""
    import torch

    recipe.cleanup()
    torch.distributed.destroy_process_group()
    return code


def main(argv: list[str]) -> int:
    try:
        cfg, _ = load_config(argv)
        cfg.validate()
    except ConfigError as e:
        print(f"ds_dpo: {e}", file=sys.stderr)
        return 2

    from ds_dpo.recipe import DPORecipe, NonFiniteError

    recipe = DPORecipe(cfg)
    try:
        recipe.setup()
    except (ConfigError, DataError) as e:
        print(f"ds_dpo: {e}", file=sys.stderr)
        return 2
    try:
        recipe.train()
    except NonFiniteError as e:
        print(f"ds_dpo: {e}", file=sys.stderr)
        return 1
    if recipe.preempted:
        if recipe.rank == 0:
            print(f"ds_dpo: stopped by a signal at step {recipe.stopped_at}; checkpoint saved under "
                  f"{cfg.output_dir}/checkpoints. Resume with the same command plus --resume_from_checkpoint auto")
        return finish(recipe, 0)
    recipe.save()
    if recipe.rank == 0 and recipe.final_eval:
        print(f"held-out reward accuracy: {recipe.final_eval['eval_rewards/accuracies']:.4f} "
              f"(eval loss {recipe.final_eval['eval_loss']:.4f}); model saved to {cfg.output_dir}")
    return finish(recipe, 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
