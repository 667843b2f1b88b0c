"""Run a training job and, when it fails, restart it from its last whole checkpoint, up to N times.

    python launch/retry.py --max_restarts 3 -- deepspeed --num_gpus 8 launch/train.py --config run.yaml
    MAX_RESTARTS=3 sbatch --nodes 2 launch/slurm.sh --config run.yaml            # the same under SLURM

What torchrun's ``--max-restarts`` and a SLURM requeue do, for any launcher: a job that ended because a rank was
lost (exit status 4), killed by a signal, or stopped on an unexpected error (1) is started again with
``--resume_from_checkpoint auto`` appended, which continues exactly where the last whole checkpoint left it (and from
the beginning when none was written yet). Ends a restart cannot mend are not retried: a bad config or data (2), a
checkpoint that cannot be written or read (3: a full disk needs an operator), non-finite steps (5: they would come
back). A SIGTERM or SIGINT to this script goes to the job, which saves and stops (preemption); it is not restarted.
"""

import argparse
import signal
import subprocess
import sys
import time

FINAL = {0: "finished", 2: "bad config or data", 3: "a checkpoint problem", 5: "non-finite steps"}
"""Exit statuses a restart cannot change."""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_restarts", type=int, default=3, help="restarts after the first attempt (default 3)")
    parser.add_argument("--wait", type=float, default=10, help="seconds between a failure and its restart")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the job's command, after `--`")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the job's command after `--`")

    job: subprocess.Popen | None = None
    stopping = False

    def forward(signum, frame):  # preemption or Ctrl-C: the job saves and stops; no restart after it
        nonlocal stopping
        stopping = True
        if job is not None and job.poll() is None:
            job.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    attempt = 0
    while True:
        job = subprocess.Popen(command + (["--resume_from_checkpoint", "auto"] if attempt else []))
        status = job.wait()
        if status in FINAL or stopping:
            return status
        if status < 0:
            why = f"killed by {signal.Signals(-status).name}"
        elif status > 128 and status - 128 in signal.valid_signals():
            why = f"exit status {status}: {signal.Signals(status - 128).name}"
        else:
            why = f"exit status {status}"
        if attempt == args.max_restarts:
            print(f"ds_dpo retry: the job failed ({why}); no restarts left (--max_restarts {args.max_restarts})")
            return status
        attempt += 1
        print(
            f"ds_dpo retry: the job failed ({why}); restart {attempt} of {args.max_restarts} in {args.wait:g} s, "
            "from its last whole checkpoint",
            flush=True,
        )
        time.sleep(args.wait)
        if stopping:
            return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
