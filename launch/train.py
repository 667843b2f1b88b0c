"""Train a policy with DPO on DeepSpeed.

    deepspeed --num_gpus 2 launch/train.py                                   # the built-in tiny task
    deepspeed --num_gpus 8 launch/train.py --config run.yaml --beta 0.2     # your model and data
    deepspeed --hostfile hosts launch/train.py --config run.yaml            # several nodes
    python launch/train.py --config run.yaml                                 # one process, no launcher

Any config key can be given as ``--key value`` (docs/configuration.md); they override the YAML.
Exit status: 0 finished, preempted or stopped before its deadline (checkpoint saved); 2 bad config or data; 3 a
checkpoint could not be written or read back (a full disk, a damaged checkpoint; the message says which); 4 a rank of
the job was lost (killed, crashed, its node hung or gone: the message names it and the last whole checkpoint); 5
stopped on non-finite steps (checkpoint saved); 1 an unexpected error (a traceback). launch/retry.py restarts a job that ended with 1, 4 or a signal.
"""

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ds_dpo.config import ConfigError, eval_prefix, load_config  # noqa: E402
from ds_dpo.data.pipeline import DataError  # noqa: E402

NON_FINITE = 5
"""Exit status of a run stopped on non-finite steps: a restart would meet them again."""


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        from ds_dpo.config.docs import key_help

        print(f"{__doc__}\nConfig keys (defaults; every one in full: docs/configuration.md):{key_help()}")
        return 0
    try:
        cfg = load_config(argv)
        cfg.validate()
    except ConfigError as e:
        print(f"ds_dpo: {e}", file=sys.stderr)
        return 2

    import torch

    from ds_dpo.training.checkpoint import CheckpointError
    from ds_dpo.training.recipe import DPORecipe

    recipe, status, error = DPORecipe(cfg), None, None
    try:
        recipe.setup()
        result = recipe.train()
        if result.status == "finished":
            recipe.save()
        status = NON_FINITE if result.status == "non_finite" else 0
    except (ConfigError, DataError) as e:
        print(f"ds_dpo: {e}", file=sys.stderr)
        status = 2
    except CheckpointError as e:
        print(f"ds_dpo: {e}", file=sys.stderr)
        status = 3
    except Exception as e:
        recipe.failed()  # a lost rank ends the process here, with a message naming it
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        recipe.cleanup(status in (0, NON_FINITE), status, error)
        # Explicitly: left to interpreter exit, gloo's threads can abort a rank after a successful run.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if status == NON_FINITE:
        print(f"ds_dpo: {result.message}", file=sys.stderr)
    if status != 0 or recipe.rank != 0:
        return status
    if result.status in ("preempted", "deadline"):
        why = (
            "by a signal" if result.status == "preempted" else "before the time limit (max_time or the SLURM job's end)"
        )
        print(
            f"ds_dpo: stopped {why} at step {result.step}; checkpoint saved under {cfg.output_dir}/"
            "checkpoints. Resume with the same command plus --resume_from_checkpoint auto"
        )
    elif result.eval_metrics:
        metrics = result.eval_metrics
        accuracies = ", ".join(  # each eval set's, named where there are several
            f"{name + ' ' if name else ''}{metrics[eval_prefix(name) + 'rewards/accuracies']:.4f} "
            f"(eval loss {metrics[eval_prefix(name) + 'loss']:.4f})"
            for name in recipe.eval_data
        )
        print(f"held-out reward accuracy: {accuracies}; model saved to {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    status = main(sys.argv[1:])
    # The run is over: logs closed, checkpoints and the model written, the process group destroyed. Leave without the
    # interpreter's teardown, in which a library's C++ thread still joinable when its object is destroyed aborts the
    # process ("terminate called without an active exception", seen at random after a finished LoRA run): a
    # finished run must exit with its status, not SIGABRT (launch/retry.py would restart it).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
