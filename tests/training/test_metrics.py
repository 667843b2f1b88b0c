"""TensorBoard as the HF Trainer lays it out, read back from the event files."""

import json
import struct
import time

import torch
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata
from tensorboard.util import tensor_util

from ds_dpo.training.loggers import MetricsLogger, histogram_tag, tensorboard_tag


def logged(loss, margin, prefix=""):
    return {f"{prefix}loss": loss, f"{prefix}rewards/margins": margin, f"{prefix}rewards/accuracies": 0.5}


def test_tags_follow_the_hf_trainer():
    assert tensorboard_tag("loss") == "train/loss" and tensorboard_tag("rewards/margins") == "train/rewards/margins"
    assert tensorboard_tag("eval_rewards/margins") == "eval/rewards/margins"
    assert histogram_tag("eval_rewards/margins") == "eval/rewards/margins_histogram"


def test_each_run_is_its_own_folder_with_train_and_eval_on_one_chart(tmp_path):
    """Two runs of a sweep share a ``logging_dir``; each is ``<logging_dir>/<run_name>`` with ``train/`` and
    ``eval/`` scalars and a custom-scalars chart per metric holding both; metrics.jsonl keeps TRL's names."""
    board = tmp_path / "board"
    for beta, margin in (("beta0.1", 0.5), ("beta0.5", 2.0)):
        (tmp_path / beta).mkdir()  # the run's output_dir, made by the run before its logger
        logger = MetricsLogger(tmp_path / beta, rank=0, total_steps=2, run_name=beta, logging_dir=board)
        logger.log(1, logged(0.69, margin))
        logger.log(2, logged(0.6, 2 * margin))
        logger.log(2, logged(0.65, margin, "eval_"), {"eval_rewards/margins": torch.tensor([margin, 0.0, -margin])})
        logger.close()
    assert sorted(p.name for p in board.iterdir()) == ["beta0.1", "beta0.5"]
    events = EventAccumulator(str(board / "beta0.5")).Reload()
    assert {"train/loss", "train/rewards/margins", "eval/loss", "eval/rewards/margins"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("train/rewards/margins")] == [(1, 2.0), (2, 4.0)]
    histogram = events.Histograms("eval/rewards/margins_histogram")[0].histogram_value
    assert (histogram.num, histogram.min, histogram.max) == (3, -2.0, 2.0)
    # As TensorBoard itself reads the run (one kind of data per tag): the margin scalars and the histogram both show
    board_events = plugin_event_accumulator.EventAccumulator(str(board / "beta0.5"))
    board_events.Reload()
    assert {"train/rewards/margins", "eval/rewards/margins"} <= set(board_events.PluginTagToContent("scalars"))
    assert set(board_events.PluginTagToContent("histograms")) == {"eval/rewards/margins_histogram"}
    assert [
        (e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in board_events.Tensors("eval/rewards/margins")
    ] == [(2, 2.0)]
    buckets = tensor_util.make_ndarray(board_events.Tensors("eval/rewards/margins_histogram")[0].tensor_proto)
    assert buckets[:, 2].sum() == 3  # [left, right, count] rows
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors(metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["rewards/margins"] == ["train/rewards/margins", "eval/rewards/margins"]
    rows = [json.loads(line) for line in (tmp_path / "beta0.5" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1] == {"step": 2, **logged(0.65, 2.0, "eval_")}


def test_default_run_is_named_after_the_output_dir(tmp_path):
    (tmp_path / "my-run").mkdir()
    logger = MetricsLogger(tmp_path / "my-run", rank=0, total_steps=1)
    logger.log(1, logged(0.69, 0.0))
    logger.close()
    assert [p.name for p in (tmp_path / "my-run" / "runs").iterdir()] == ["my-run"]


def wandb_records(run_dir) -> tuple[dict, list[dict]]:
    """The config and history rows of an offline wandb run, read back from its ``run-*.wandb`` file (LevelDB's log
    format: 32 KiB blocks of records with a 7-byte header, after wandb's own 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, config, history = 7, b"", {}, []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):  # a record continues in the next block unless this piece is whole or its last
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        # the config comes with the run record, or (when wandb is slower to start) as a config record of its own
        if record.WhichOneof("record_type") in ("run", "config"):
            updates = record.run.config.update if record.HasField("run") else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
        if record.WhichOneof("record_type") == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return config, history


def written_records(run_dir, rows: int, timeout: float = 30.0) -> tuple[dict, list[dict]]:
    """``wandb_records`` once ``rows`` history rows are in the file: wandb's service process writes the file, and
    may still be writing it when ``finish`` has returned (seen on a loaded machine: the file without its rows)."""
    deadline = time.monotonic() + timeout
    while True:
        config, history = wandb_records(run_dir)
        if len(history) >= rows or time.monotonic() > deadline:
            return config, history
        time.sleep(0.2)


def test_wandb_offline_run_has_the_hf_tags_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "beta0.1"
    out.mkdir()
    logger = MetricsLogger(out, rank=0, total_steps=2, report_to=("wandb",), config={"beta": 0.1})
    logger.log(1, logged(0.69, 0.5))
    logger.log(1, logged(0.65, 0.5, "eval_"), {"eval_rewards/margins": torch.tensor([0.5, 0.0, -0.5])})
    logger.close()
    assert not (out / "metrics.jsonl").exists() and not (out / "runs").exists()  # only what report_to names
    run_id = (out / "wandb_run_id").read_text()
    first = next((out / "wandb").glob(f"offline-run-*-{run_id}"))
    config, rows = written_records(first, rows=2)
    assert config["beta"] == 0.1
    assert rows[0]["train/loss"] == 0.69 and rows[0]["train/global_step"] == 1
    assert rows[1]["eval/loss"] == 0.65 and rows[1]["eval/rewards/margins"] == 0.5  # the histogram keeps its own key
    assert rows[1]["eval/rewards/margins_histogram/_type"] == "histogram"

    time.sleep(1.1)  # wandb names an offline run folder by the second it starts (a real resume is a new process)
    resumed = MetricsLogger(out, rank=0, total_steps=2, initial=1, report_to=("wandb",))
    resumed.log(2, logged(0.6, 1.0))
    resumed.close()
    assert (out / "wandb_run_id").read_text() == run_id
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2, [str(d.name) for d in (out / "wandb").iterdir()]
    second = next(d for d in runs if d != first)
    assert written_records(second, rows=1)[1][0]["train/global_step"] == 2
