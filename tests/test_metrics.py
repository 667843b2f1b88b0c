"""TensorBoard as the HF Trainer lays it out, read back from the event files."""

import json

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

from ds_dpo.metrics import MetricsLogger, tensorboard_tag


def logged(loss, margin, prefix=""):
    return {f"{prefix}loss": loss, f"{prefix}rewards/margins": margin, f"{prefix}rewards/accuracies": 0.5}


def test_tags_follow_the_hf_trainer():
    assert tensorboard_tag("loss") == "train/loss" and tensorboard_tag("rewards/margins") == "train/rewards/margins"
    assert tensorboard_tag("eval_rewards/margins") == "eval/rewards/margins"


def test_each_run_is_its_own_folder_with_train_and_eval_on_one_chart(tmp_path):
    """Two runs of a sweep share a ``logging_dir``; each is ``<logging_dir>/<run_name>`` with ``train/`` and
    ``eval/`` scalars and a custom-scalars chart per metric holding both; metrics.jsonl keeps TRL's names."""
    board = tmp_path / "board"
    for beta, margin in (("beta0.1", 0.5), ("beta0.5", 2.0)):
        (tmp_path / beta).mkdir()  # the run's output_dir, made by the run before its logger
        logger = MetricsLogger(tmp_path / beta, rank=0, total_steps=2, run_name=beta, logging_dir=board)
        logger.log(1, logged(0.69, margin))
        logger.log(2, logged(0.6, 2 * margin))
        logger.log(2, logged(0.65, margin, "eval_"),
                   {"eval_rewards/margins": torch.tensor([margin, 0.0, -margin])})
        logger.close()
    assert sorted(p.name for p in board.iterdir()) == ["beta0.1", "beta0.5"]
    events = EventAccumulator(str(board / "beta0.5")).Reload()
    assert {"train/loss", "train/rewards/margins", "eval/loss", "eval/rewards/margins"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("train/rewards/margins")] == [(1, 2.0), (2, 4.0)]
    histogram = events.Histograms("eval/rewards/margins")[0].histogram_value
    assert (histogram.num, histogram.min, histogram.max) == (3, -2.0, 2.0)
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
