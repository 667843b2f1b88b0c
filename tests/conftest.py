import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
HH_DATA = Path(os.environ.get("DS_DPO_HH_DATA", REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"))
"""Anthropic HH-RLHF, harmless-base test split (2,312 rows, the `test.jsonl.gz` of the dataset's `harmless-base/`)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository in its own process group; past ``timeout`` seconds the whole group (the
    launcher and every rank it started) is killed and the test fails with the output so far, so that a hung run
    costs one test, not the rest of the suite."""
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as job:
        try:
            out, err = job.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            out, err = job.communicate()
            raise AssertionError(f"{' '.join(cmd)} still running after {timeout} s, killed:\n{out[-6000:]}\n"
                                 f"{err[-6000:]}") from None
    return subprocess.CompletedProcess(cmd, job.returncode, out, err)


def launch(*args: str, nprocs: int = 2, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run launch/train.py ARGS on ``nprocs`` ranks as ``deepspeed --num_gpus N`` does (real engines, CPU ranks on a
    CPU machine), but without the launcher: its own start costs ~10 s per launch and these tests are not about it
    (those that are run ``deepspeed`` themselves). Each rank gets the environment the launcher would give it; the
    result combines their outputs as the launcher's does. If a rank fails, the others, which cannot finish without
    it, are killed and the result has its exit status; past ``timeout`` seconds all are killed and the test fails."""
    train, port = [sys.executable, "-u", "launch/train.py"], str(free_port())
    cmd = [*train, *args]
    # LOCAL_SIZE is DeepSpeed's (its CPU accelerator and shm all-reduce read it); torchrun's LOCAL_WORLD_SIZE is set
    # too so that the 1-rank one `single_rank` may have left in this process's environment does not reach the ranks
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(nprocs),
           "LOCAL_SIZE": str(nprocs), "LOCAL_WORLD_SIZE": str(nprocs), "CROSS_RANK": "0", "CROSS_SIZE": "1"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        ranks = []
        for rank in range(nprocs):  # all in rank 0's process group: one killpg also reaches what they started
            ranks.append(subprocess.Popen([*train, f"--local_rank={rank}", *args], cwd=REPO, stdout=out, stderr=err,
                                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                          process_group=ranks[0].pid if ranks else 0))
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
                raise AssertionError(f"{' '.join(cmd)} still running after {timeout} s, killed:\n"
                                     f"{out.read()[-6000:]}\n{err.read()[-6000:]}")
        out.seek(0), err.seek(0)
        proc = subprocess.CompletedProcess(cmd, returncode, out.read(), err.read())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(output_dir: Path, prefix: str = "") -> list[dict]:
    """Logged metric records, training ones (``prefix=''``) or eval ones (``prefix='eval_'``)."""
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if any(k.startswith(prefix) for k in r if k != "step") and
            (prefix or "loss" in r)]


def assert_same_weights(a: Path, b: Path, tol: float = 1e-6) -> None:
    """Two runs' exported weights (the adapter where the run trained one) agree to ``tol``."""
    from safetensors.torch import load_file

    def weights(output_dir):
        adapter = output_dir / "adapter_model.safetensors"
        return load_file(adapter if adapter.exists() else output_dir / "model.safetensors")

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= tol


@pytest.fixture
def hh_data() -> Path:
    """The HH-RLHF file; tests that need it are skipped, saying how to get it, where it is absent."""
    if not HH_DATA.is_file():
        pytest.skip(f"HH-RLHF data not found at {HH_DATA}: download `harmless-base/test.jsonl.gz` of the Hub dataset "
                    "Anthropic/hh-rlhf and set DS_DPO_HH_DATA to its path")
    return HH_DATA


@pytest.fixture(scope="session")
def builtin_files(tmp_path_factory) -> dict[str, str]:
    """The built-in tiny model, tokenizer and train/eval pairs, generated once for the session."""
    from ds_dpo import builtin

    return builtin.materialize(tmp_path_factory.mktemp("builtin"), seed=42)


@pytest.fixture(scope="session")
def single_rank():
    """A one-rank gloo process group for in-process DeepSpeed engines."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    from ds_dpo import engines

    yield engines.init_distributed()
    engines.release_shm_buffers()


@pytest.fixture(autouse=True)
def _no_leftover_zero3():
    """An in-process ZeRO-3 engine leaves transformers' global HfDeepSpeedConfig set, which would make every later
    ``from_pretrained``/``from_config`` in this process build a partitioned model; reset it after each test."""
    yield
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
