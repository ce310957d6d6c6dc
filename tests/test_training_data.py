"""Data: file formats, row validation with file/row/column in the message, duplicate-free batches."""

import json

import pytest

from gist_fast.training.data import BatchSchedule, NoDuplicatesBatches, load_pairs

ROWS = [
    {"anchor": "a0", "positive": "p0", "negative": "n0"},
    {"anchor": "a1", "positive": "p1", "negative": "n1"},
    {"anchor": "a2", "positive": "p2", "negative": "n2"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_formats_agree(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    _jsonl(tmp_path / "d.jsonl", ROWS)
    loaded = [load_pairs(tmp_path / f"d.{ext}") for ext in ("jsonl", "csv", "parquet")]
    loaded += [load_pairs(ds), load_pairs(ROWS), load_pairs({k: [r[k] for r in ROWS] for k in ROWS[0]})]
    for d in loaded:
        assert (d.anchors, d.positives, d.negatives) == (["a0", "a1", "a2"], ["p0", "p1", "p2"], [["n0", "n1", "n2"]])
    assert len({d.fingerprint() for d in loaded}) == 1
    none = load_pairs(ROWS, negative_columns=[])
    assert none.negatives == [] and none.fingerprint() != loaded[0].fingerprint()


def test_column_names_are_configurable(tmp_path):
    rows = [{"q": "a", "d": "b", "hard1": "c", "hard2": "e"}]
    d = load_pairs(
        _jsonl(tmp_path / "x.jsonl", rows), anchor_column="q", positive_column="d", negative_columns=["hard2"]
    )
    assert (d.anchors, d.positives, d.negatives) == (["a"], ["b"], [["e"]])


@pytest.mark.parametrize(
    ("value", "problem"), [(None, "missing"), (7, "not a string"), ("   ", "empty"), (["x"], "not a string")]
)
def test_bad_row_names_file_row_and_column(tmp_path, value, problem):
    rows = [dict(r) for r in ROWS]
    rows[2]["positive"] = value
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=problem) as info:
        load_pairs(path)
    msg = str(info.value)
    assert "bad.jsonl" in msg and "row 2" in msg and "'positive'" in msg


def test_missing_column_lists_the_columns(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"query": "a", "positive": "b"}])
    with pytest.raises(ValueError, match=r"d.jsonl.*'anchor' is missing.*query"):
        load_pairs(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_pairs(tmp_path / "nope.jsonl")


def _dup_rows(n, seed=0):
    import random

    rng = random.Random(seed)
    # few distinct anchors and shared positives: many potential duplicates
    return {
        "anchor": [f"a{rng.randrange(n // 3)}" for _ in range(n)],
        "positive": [f"p{i % (n // 2)}" for i in range(n)],
    }


def test_no_duplicates_and_every_row_once_per_epoch():
    data = load_pairs(_dup_rows(300))
    sampler = NoDuplicatesBatches(data, 16, seed=1)
    for epoch in range(3):
        batches = sampler.epoch(epoch)
        assert sorted(i for b in batches for i in b) == list(range(300))
        for b in batches:
            texts = [t for i in b for t in (data.anchors[i], data.positives[i])]
            assert len(texts) == len(set(texts)), f"duplicate text in batch {b}"
            assert len(b) <= 16
    assert sampler.epoch(0) != sampler.epoch(1)
    assert NoDuplicatesBatches(data, 16, seed=1).epoch(0) == sampler.epoch(0)
    assert NoDuplicatesBatches(data, 16, seed=2).epoch(0) != sampler.epoch(0)
    dropped = NoDuplicatesBatches(data, 16, seed=1, drop_last=True).epoch(0)
    assert all(len(b) == 16 for b in dropped)


def test_schedule_resumes_in_the_same_order():
    data = load_pairs(_dup_rows(90))
    sampler = NoDuplicatesBatches(data, 8, seed=0)
    full = list(BatchSchedule(sampler, max_steps=30).iterate())
    assert len(full) == 30 and full[-1][0].epoch >= 2  # the budget spans epochs
    assert list(BatchSchedule(sampler, max_steps=30).iterate(17)) == full[17:]
    by_epochs = BatchSchedule(sampler, epochs=2)
    assert by_epochs.total_steps == len(sampler.epoch(0)) + len(sampler.epoch(1))
    with pytest.raises(ValueError, match="max_steps"):
        BatchSchedule(sampler, max_steps=0)


@pytest.mark.parametrize(
    ("name", "content", "named"),
    [
        ("empty.jsonl", b"", "the file is empty"),
        ("blank.jsonl", b"\n  \n", "the file is empty"),
        ("empty.csv", b"", "the file is empty"),
        ("header.csv", b"anchor,positive\n", "no rows (only the header line"),
        ("latin1.csv", "anchor,positive\nq,d\ncaf\xe9,x\n".encode("latin-1"), "line 3: not UTF-8 text (byte 0xe9"),
        ("bad.jsonl", b'{"anchor": "a", "positive": "b"}\n{"anchor": "c", \n', "line 2: not valid JSON"),
        ("list.jsonl", b'{"anchor": "a", "positive": "b"}\n["c", "d"]\n', "line 2: expected an object"),
        ("short.csv", b"anchor,positive\nq,d\nonly-one\n", "line 3: 1 fields, but the header has 2"),
        (
            "surrogate.jsonl",
            b'{"anchor": "a", "positive": "b"}\n{"anchor": "c\\ud800", "positive": "d"}\n',
            "row 1 (0-based): column 'anchor' has a lone surrogate",
        ),  # fmt: skip
        ("surrogate.csv", b"anchor,positive\nq,\xed\xa0\x80\n", "line 2: not UTF-8 text"),
    ],
)
def test_a_bad_file_is_named_in_one_line(tmp_path, name, content, named):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_pairs(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and named in msg and "\n" not in msg, msg


def test_files_are_read_as_written(tmp_path):
    """CSV values stay the texts written (no number or null guessing); a .json file may hold a list."""
    path = tmp_path / "d.tsv"
    path.write_text('anchor\tpositive\tnegative\n3\t1e5\tnull\n\ufeffx\t"quoted\ttab"\tn\n')
    d = load_pairs(path)
    assert (d.anchors, d.positives, d.negatives) == (["3", "\ufeffx"], ["1e5", "quoted\ttab"], [["null", "n"]])
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert load_pairs(path).anchors == ["a0", "a1", "a2"]


def _all_rows(sampler, epoch):
    return sorted([i for b in sampler.epoch(epoch) for i in b] + sampler.left_out(epoch))


def test_a_one_row_tail_joins_the_batch_before():
    data = load_pairs({"anchor": [f"a{i}" for i in range(9)], "positive": [f"p{i}" for i in range(9)]})
    sampler = NoDuplicatesBatches(data, 8, seed=0)
    assert [len(b) for b in sampler.epoch(0)] == [9] and sampler.left_out(0) == []
    assert [len(b) for b in NoDuplicatesBatches(data, 4, seed=0).epoch(0)] == [4, 5]
    assert [len(b) for b in NoDuplicatesBatches(data, 4, seed=0, min_rows=3).epoch(0)] == [4, 5]
    assert [len(b) for b in NoDuplicatesBatches(data, 4, seed=0, drop_last=True).epoch(0)] == [4, 5]
    with pytest.raises(ValueError, match="min_rows must be >= 2"):
        NoDuplicatesBatches(data, 4, min_rows=1)


def test_rows_that_share_a_text_with_every_batch_are_left_out():
    same = load_pairs({"anchor": ["q"] * 6, "positive": [f"p{i}" for i in range(6)]})
    sampler = NoDuplicatesBatches(same, 4, seed=0)
    assert sampler.epoch(0) == [] and sorted(sampler.left_out(0)) == list(range(6))
    # one hub row shares a text with every other row; the rest batch normally
    hub = load_pairs({"anchor": ["q", "q", "r", "s", "t"], "positive": ["p", "x", "p", "y", "z"]})
    sampler = NoDuplicatesBatches(hub, 2, seed=3)
    assert _all_rows(sampler, 0) == list(range(5))
    assert all(len(b) >= 2 for b in sampler.epoch(0))


@pytest.mark.parametrize("min_rows", [2, 3])
def test_every_batch_has_min_rows_no_duplicates_and_every_row_once(min_rows):
    data = load_pairs(_dup_rows(120, seed=4))
    for batch_size in (3, 7, 16):
        if batch_size < min_rows:
            continue
        sampler = NoDuplicatesBatches(data, batch_size, seed=2, min_rows=min_rows)
        for epoch in range(3):
            assert _all_rows(sampler, epoch) == list(range(120))
            for b in sampler.epoch(epoch):
                assert min_rows <= len(b) <= (batch_size + 1 if min_rows == 2 else 2 * batch_size)
                texts = [t for i in b for t in (data.anchors[i], data.positives[i])]
                assert len(texts) == len(set(texts))
        schedule = BatchSchedule(sampler, epochs=2)
        steps = list(schedule.iterate())
        assert len(steps) == schedule.total_steps == len(sampler.epoch(0)) + len(sampler.epoch(1))
        assert list(BatchSchedule(sampler, epochs=2).iterate(3)) == steps[3:]


@pytest.fixture
def tiny_models(tmp_path):
    from gist_fast.training.testing import make_tiny_encoder

    make_tiny_encoder(tmp_path / "s", seed=0).save(tmp_path / "student")
    make_tiny_encoder(tmp_path / "g", hidden_size=24, seed=1, normalize=True).save(tmp_path / "guide")
    return tmp_path


def _train(p, rows, *extra):
    from gist_fast.cli import main

    _jsonl(p / "d.jsonl", rows)
    return main(
        ["train", "--student", str(p / "student"), "--guide", str(p / "guide"), "--data", str(p / "d.jsonl"),
         "--output", str(p / "out"), "--batch-size", "8", "--mini-batch-size", "4", "--max-seq-length", "16",
         "--no-progress", *extra]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("rows", "named"),
    [
        ([{"anchor": "q", "positive": "d"}], "has 1 row; a contrastive step needs at least 2 rows"),
        ([{"anchor": "q", "positive": f"d{i}"} for i in range(5)], "'q' is in 5 of 5 rows"),
    ],
)
def test_data_that_cannot_train_is_refused(tiny_models, capsys, rows, named):
    assert _train(tiny_models, rows, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "d.jsonl" in err and named in err and "Traceback" not in err, err
    assert not (tiny_models / "out").exists()


def test_no_step_on_fewer_than_two_rows(tiny_models, capsys):
    """9 rows in batches of 8: the 1-row tail joins the first batch (one step of 9 rows, not 8 + 1);
    a row sharing a text with every batch is left out with a warning."""
    rows = [{"anchor": f"value {i}", "positive": f"the file {i}"} for i in range(9)]
    assert _train(tiny_models, rows, "--epochs", "2", "--overwrite") == 0
    log = [json.loads(line) for line in (tiny_models / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["rows"]) for r in log if "loss" in r] == [(0, 9), (1, 9)]
    assert all(r["loss"] > 0 for r in log if "loss" in r)
    rows = [{"anchor": "hub", "positive": "shared"}] + [
        {"anchor": "hub" if i % 2 else f"value {i}", "positive": f"the file {i}" if i % 2 else "shared"}
        for i in range(1, 5)
    ]  # every row shares "hub" or "shared" with row 0, and rows 1-4 pair up
    assert _train(tiny_models, rows, "--epochs", "1", "--overwrite", "--batch-size", "2") == 0
    err = capsys.readouterr().err
    assert "rows share a text with every batch of the epoch and are left out" in err
    results = json.loads((tiny_models / "out" / "results.json").read_text())
    assert len(results["warnings"]) == 1


def test_the_trainer_asks_for_one_row_per_process(tmp_path):
    """Under torchrun with 3 processes a batch needs 3 rows (each rank encodes its slice): an epoch's
    2-row tail joins the batch before instead of giving a step that every rank skips."""
    from gist_fast.training import TrainConfig, Trainer
    from gist_fast.training import distributed as dtrain

    trainer = Trainer(TrainConfig(output=str(tmp_path / "o"), batch_size=6, progress=False))
    trainer.dist = dtrain.DistInfo(rank=0, world=3)
    trainer._check_trainable(load_pairs({"anchor": [f"a{i}" for i in range(8)], "positive": list("pqrstuvw")}))
    assert trainer._sampler.min_rows == 3
    assert [len(b) for b in trainer._sampler.epoch(0)] == [8]
    assert not (tmp_path / "o").exists()
