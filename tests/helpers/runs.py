"""Running ds_dpo as a user does: launch/train.py on several CPU ranks, a job with a time limit, and reading back
what a run wrote."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
HH_DATA = Path(
    os.environ.get("DS_DPO_HH_DATA", REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz")
)
"""Anthropic HH-RLHF, harmless-base test split (2,312 rows, the `test.jsonl.gz` of the dataset's `harmless-base/`)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository in its own process group; past ``timeout`` seconds the whole group (the
    launcher and every rank it started) is killed and the test fails with the output so far, so that a hung run
    costs one test, not the rest of the suite."""
    with subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as job:
        try:
            out, err = job.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            out, err = job.communicate()
            raise AssertionError(
                f"{' '.join(cmd)} still running after {timeout} s, killed:\n{out[-6000:]}\n{err[-6000:]}"
            ) from None
    return subprocess.CompletedProcess(cmd, job.returncode, out, err)


def cli(*args: str, **keys) -> list[str]:
    """Command-line arguments: ``args`` as they are, then ``--key value`` for each of ``keys`` (values as the command
    line reads them: parsed as YAML)."""
    return [*args, *(part for key, value in keys.items() for part in (f"--{key}", str(value)))]


def launch(
    *args: str, nprocs: int = 2, check: bool = True, timeout: float = 600, **keys
) -> subprocess.CompletedProcess:
    """Run launch/train.py ARGS (then ``--key value`` for ``keys``) on ``nprocs`` ranks as ``deepspeed --num_gpus N`` does (real engines, CPU ranks on a
    CPU machine), but without the launcher: its own start costs ~10 s per launch and these tests are not about it
    (those that are run ``deepspeed`` themselves). Each rank gets the environment the launcher would give it; the
    result combines their outputs as the launcher's does. If a rank fails, the others, which cannot finish without
    it, are killed and the result has its exit status; past ``timeout`` seconds all are killed and the test fails."""
    train, port = [sys.executable, "-u", "launch/train.py"], str(free_port())
    args = cli(*args, **keys)
    cmd = [*train, *args]
    # LOCAL_SIZE is DeepSpeed's (its CPU accelerator and shm all-reduce read it); torchrun's LOCAL_WORLD_SIZE is set
    # too so that the 1-rank one `single_rank` may have left in this process's environment does not reach the ranks
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "WORLD_SIZE": str(nprocs),
        "LOCAL_SIZE": str(nprocs),
        "LOCAL_WORLD_SIZE": str(nprocs),
        "CROSS_RANK": "0",
        "CROSS_SIZE": "1",
    }
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        ranks = []
        for rank in range(nprocs):  # all in rank 0's process group: one killpg also reaches what they started
            ranks.append(
                subprocess.Popen(
                    [*train, f"--local_rank={rank}", *args],
                    cwd=REPO,
                    stdout=out,
                    stderr=err,
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    process_group=ranks[0].pid if ranks else 0,
                )
            )
        deadline = time.monotonic() + timeout
        while None in (codes := [r.poll() for r in ranks]) and not any(codes) and time.monotonic() < deadline:
            time.sleep(0.1)
        returncode = next((code for code in codes if code), 0)
        if None in codes:  # a rank failed, or the time is up
            os.killpg(ranks[0].pid, signal.SIGKILL)
            for r in ranks:
                r.wait()
            for buffer in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):  # killed ranks cannot unlink
                buffer.unlink(missing_ok=True)
            if not returncode:
                out.seek(0), err.seek(0)
                raise AssertionError(
                    f"{' '.join(cmd)} still running after {timeout} s, killed:\n"
                    f"{out.read()[-6000:]}\n{err.read()[-6000:]}"
                )
        out.seek(0), err.seek(0)
        proc = subprocess.CompletedProcess(cmd, returncode, out.read(), err.read())
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def read_metrics(output_dir: Path, prefix: str = "") -> list[dict]:
    """Logged metric records, training ones (``prefix=''``) or eval ones (``prefix='eval_'``)."""
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if any(k.startswith(prefix) for k in r if k != "step") and (prefix or "loss" in r)]


def stopped_at(whole: Path, step: int, run: Path) -> None:
    """``run``: the output directory of ``whole`` as a run that stopped after saving checkpoint ``step`` would have
    left it (no later checkpoints and metrics, no exported model), to resume without running that run."""
    exported = lambda folder, names: [  # noqa: E731  the final model's files, not a checkpoint's
        n for n in names if Path(folder) == Path(whole) and n.endswith(".safetensors") or n.startswith("events.")
    ]
    shutil.copytree(whole, run, ignore=exported)
    checkpoints = run / "checkpoints"
    for later in checkpoints.glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    (checkpoints / "latest").write_text(f"step-{step}")
    metrics = run / "metrics.jsonl"
    metrics.write_text(
        "".join(line for line in metrics.read_text().splitlines(True) if json.loads(line)["step"] <= step)
    )


def assert_same_weights(a: Path, b: Path, tol: float = 1e-6) -> None:
    """Two runs' exported weights (the adapter where the run trained one) agree to ``tol``."""
    from safetensors.torch import load_file

    def weights(output_dir):
        adapter = output_dir / "adapter_model.safetensors"
        return load_file(adapter if adapter.exists() else output_dir / "model.safetensors")

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= tol


SHORT = ["--max_steps", "8", "--logging_steps", "1", "--save_steps", "0", "--eval_steps", "100"]
"""Command-line arguments of a short launched run: 8 steps, each logged, no checkpoints."""


def losses(output_dir) -> list[float]:
    """The logged training losses of a run, in order."""
    return [r["loss"] for r in read_metrics(output_dir)]


def set_up(*argv: str, **keys):
    """An in-process run as launch/train.py sets it up: the config from command-line arguments (``argv``, then
    ``keys`` as ``--key value``), validated, the recipe set up (the caller trains it and calls ``cleanup``)."""
    from ds_dpo.config import load_config
    from ds_dpo.training.recipe import DPORecipe

    cfg = load_config(cli(*argv, **keys))
    cfg.validate()
    recipe = DPORecipe(cfg)
    recipe.setup()
    return recipe


def short_run(model_dir: str, data: Path, out: Path, steps: int, *options: str, **keys):
    """``set_up`` of a short run: 4 pairs per step from ``data`` (also the eval set), lr 3e-3, every step logged;
    ``options``/``keys``: more arguments, as ``set_up`` takes them."""
    defaults = cli(
        model_name_or_path=model_dir,
        dataset=data,
        eval_dataset=data,
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        save_steps=0,
        output_dir=out,
    )
    return set_up(*defaults, *options, **keys)
