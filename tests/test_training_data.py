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
