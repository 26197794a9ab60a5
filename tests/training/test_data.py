"""Dataset formats, loading and the collator, on real STS-B / NLI rows."""

import json
import re

import pytest
import torch

from angle_torch.model import AngleModel
from training.data import (
    AngleCollator,
    check_records,
    detect_format,
    load_records,
    parse_rename,
)


@pytest.mark.parametrize(("columns", "fmt"), [
    (["text1", "text2", "label"], "A"),
    (["text1", "text2", "label", "id"], "A"),
    (["text", "positive", "negative"], "B"),
    (["query", "positive", "negative"], "B"),
    (["text", "positive"], "C"),
    (["query", "positive"], "C"),
])
def test_formats_detected(columns, fmt):
    assert detect_format(columns) == fmt


@pytest.mark.parametrize(("columns", "hint"), [
    (["sentence1", "sentence2", "score"], "sentence1:text1,sentence2:text2,score:label"),
    (["anchor", "positive", "negative"], "anchor:text"),
    (["text1", "text2"], None),
    (["text"], None),
    (["text", "positive", "label"], None),
])
def test_wrong_layouts_refused_naming_columns(columns, hint):
    with pytest.raises(ValueError) as exc:
        detect_format(columns)
    msg = str(exc.value)
    assert str(sorted(columns)) in msg and "text1, text2, label" in msg
    if hint:
        assert hint in msg


def test_nli_columns_get_no_rename_that_reads_classes_as_similarity():
    with pytest.raises(ValueError) as exc:
        detect_format(["premise", "hypothesis", "label"])
    msg = str(exc.value)
    assert "premise:text1" not in msg  # contradiction (2) would rank above entailment (0)
    assert "0 = entailment" in msg and "premise:text,hypothesis:positive" in msg


@pytest.mark.parametrize(("row", "why"), [
    ({"text1": "a", "text2": "b", "label": -1}, "label' is -1"),  # NLI's "no gold label"
    ({"text1": "a", "text2": "b", "label": None}, "label' is None"),
    ({"text1": "a", "text2": "b", "label": "high"}, "label' is 'high'"),
    ({"text1": "a", "text2": "b", "label": float("nan")}, "label' is nan"),
    ({"text1": "a", "label": 1.0}, "no 'text2' field"),
    ({"text1": 12, "text2": "b", "label": 1.0}, "'text1' is 12"),
    ({"text1": [], "text2": "b", "label": 1.0}, "'text1' is []"),
    ({"text1": ["a", None], "text2": "b", "label": 1.0}, "'text1' is ['a', None]"),
])
def test_bad_rows_are_refused_before_training_naming_the_row(row, why, tiny):
    good = {"text1": ["a", "b"], "text2": "c", "label": "4.5"}  # a streamed CSV's label
    with pytest.raises(ValueError, match=r"train row 2: .*" + re.escape(why)):
        check_records([good, good, row], "A")
    collate = AngleCollator(tiny.tokenizer, "A", tiny.pad_token_id)
    assert collate([good]).labels.tolist() == [4.5]
    with pytest.raises(ValueError, match=re.escape(why)):  # streamed rows: at their batch
        collate([good, row])


def test_rename_spec():
    assert parse_rename("a:b, c:d;e:f") == {"a": "b", "c": "d", "e": "f"}
    with pytest.raises(ValueError, match="old:new"):
        parse_rename("a-b")


def test_sources_jsonl_csv_parquet_and_saved(tmp_path, shared_data):
    import datasets

    rows = load_records(shared_data / "sts" / "stsb-dev.jsonl",
                        "sentence1:text1,sentence2:text2,score:label")
    assert len(rows) == 1500 and detect_format(rows[0]) == "A"
    ds = datasets.Dataset.from_list(rows[:50])
    ds.to_csv(str(tmp_path / "d.csv"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    for src in ("d.csv", "d.parquet", "saved", "saved_dict"):
        got = load_records(tmp_path / src)
        assert [r["text1"] for r in got] == [r["text1"] for r in rows[:50]], src
    triples = load_records(shared_data / "nli" / "triples.jsonl")
    assert detect_format(triples[0]) == "B"
    assert load_records(tmp_path / "d.csv", "nope:text")[0].keys() == rows[0].keys()
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_records(tmp_path / "x.txt")


def test_query_column_is_read_as_text(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    rows = load_records(path)
    assert rows == [{"text": "q", "positive": "p"}] and detect_format(rows[0]) == "C"


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    return AngleModel.from_pretrained(tiny_bert_dir, max_length=16)


def test_collator_zigzag_labels_and_prompts(tiny):
    rows = [{"text1": "a cat sits", "text2": "a cat is sitting", "label": 4.5},
            {"text1": "rain today", "text2": "stocks fell", "label": 0.2}]
    col = AngleCollator(tiny.tokenizer, "A", tiny.pad_token_id, text_prompt="query: {text}")
    batch = col(rows)
    assert batch.labels.tolist() == pytest.approx([4.5, 0.2]) and batch.n_samples == 2
    expect = tiny.tokenizer.encode(["a cat sits", "a cat is sitting", "rain today", "stocks fell"],
                                   "query: {text}")
    for i, ids in enumerate(expect):
        assert batch.input_ids[i][: len(ids)].tolist() == ids
        assert batch.attention_mask[i].sum().item() == len(ids)


def test_collator_triples_prompts_per_role(tiny):
    rows = [{"text": "q1", "positive": "p1", "negative": "n1"}]
    col = AngleCollator(tiny.tokenizer, "B", tiny.pad_token_id, query_prompt="Q: {text}",
                        doc_prompt="D: {text}")
    batch = col(rows)
    expect = [tiny.tokenizer.encode(["q1"], "Q: {text}")[0],
              tiny.tokenizer.encode(["p1"], "D: {text}")[0],
              tiny.tokenizer.encode(["n1"], "D: {text}")[0]]
    assert [r[m.bool()].tolist() for r, m in zip(batch.input_ids, batch.attention_mask,
                                                 strict=True)] == expect


def test_collator_prompt_survives_truncation(tiny):
    long_text = "word " * 100
    batch = AngleCollator(tiny.tokenizer, "C", tiny.pad_token_id, query_prompt="{text} END")(
        [{"text": long_text, "positive": "x"}])
    end_ids = tiny.tokenizer.encode(["END"])[0][1:-1]
    row = batch.input_ids[0].tolist()
    assert len(row) == 16 and row[-1 - len(end_ids):-1] == end_ids


def test_duplicates_filtered_and_lists_sampled(tiny):
    rows = [{"text": "same", "positive": "p1"}, {"text": "same", "positive": "p2"},
            {"text": ["x1", "x2"], "positive": "p3"}]
    batch = AngleCollator(tiny.tokenizer, "C", tiny.pad_token_id)(rows)
    assert batch.n_samples == 2 and batch.input_ids.shape[0] == 4
    third = tiny.tokenizer.backend.decode(batch.input_ids[2][batch.attention_mask[2].bool()]
                                          .tolist())
    assert third in ("x1", "x2")
    keep_all = AngleCollator(tiny.tokenizer, "C", tiny.pad_token_id, filter_duplicate=False)
    assert keep_all(rows).n_samples == 3
    with pytest.raises(ValueError, match="not a text"):
        keep_all([{"text": 5, "positive": "p"}])


def test_gradients_reach_the_backbone(tiny, shared_data):
    from training.losses import AngleLoss

    rows = load_records(shared_data / "sts" / "stsb-train.jsonl",
                        "sentence1:text1,sentence2:text2,score:label")[:8]
    batch = AngleCollator(tiny.tokenizer, "A", tiny.pad_token_id)(rows)
    tiny.train()
    tiny.zero_grad()
    loss = AngleLoss(cosine_w=1.0)(tiny(batch.input_ids, batch.attention_mask), batch.labels, "A")
    loss.backward()
    grads = {n: p.grad for n, p in tiny.backbone.named_parameters()}
    assert torch.isfinite(loss) and loss.item() > 0
    assert grads["embeddings.word_embeddings.weight"].abs().sum() > 0
    assert grads["encoder.layer.0.attention.self.query.weight"].abs().sum() > 0
    tiny.eval()
