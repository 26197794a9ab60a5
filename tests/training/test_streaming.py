"""`--streaming`: training data read through a shuffle buffer, memory bounded by it."""

from __future__ import annotations

import json

import pytest
import torch

from angle_torch.model import AngleModel
from training import fit as fit_mod
from training.data import StreamingData
from training.fit import TrainConfig, fit


def _rows(n: int) -> list[dict]:
    return [{"text1": f"first {i}", "text2": f"second {i}", "label": float(i % 5)}
            for i in range(n)]


def test_each_epoch_is_a_permutation_read_through_a_bounded_buffer(tmp_path, monkeypatch):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(100)))
    data = StreamingData(path, buffer=16)
    assert len(data) == 100
    epochs = [[r["text1"] for b in data.batches(e, 8, seed=1) for r in b] for e in (0, 1)]
    assert all(sorted(e) == sorted(f"first {i}" for i in range(100)) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert epochs[0] == [r["text1"] for b in data.batches(0, 8, seed=1) for r in b]
    read = [0]
    real = StreamingData.rows

    def counted(self):
        for row in real(self):
            read[0] += 1
            yield row

    monkeypatch.setattr(StreamingData, "rows", counted)
    first = next(iter(data.batches(0, 8, seed=1)))
    assert len(first) == 8 and read[0] <= 16 + 8  # the buffer and one batch, not the file


def test_streaming_fit_trains_and_resumes_exactly(tiny_bert_dir, shared_data, tmp_path,
                                                  monkeypatch):
    lines = (shared_data / "sts" / "stsb-train.jsonl").read_text().splitlines()[:64]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")

    def cfg(out, **kw):
        return TrainConfig(model=str(tiny_bert_dir), train_data=str(tmp_path / "train.jsonl"),
                           column_rename="sentence1:text1,sentence2:text2,score:label",
                           output_dir=str(out), max_steps=6, warmup_steps=1,
                           learning_rate=5e-4, streaming=True, shuffle_buffer=16,
                           **{"batch_size": 8, **kw})

    straight = fit(cfg(tmp_path / "a"))
    real_step = fit_mod._Trainer._optimizer_step

    def crash_at_five(self):
        if self.step == 4:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self)

    monkeypatch.setattr(fit_mod._Trainer, "_optimizer_step", crash_at_five)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg(tmp_path / "b", save_steps=3))
    monkeypatch.setattr(fit_mod._Trainer, "_optimizer_step", real_step)
    resumed = fit(cfg(tmp_path / "b", save_steps=3, resume=True))
    assert resumed.steps == straight.steps == 6
    ref = AngleModel.from_pretrained(straight.output_dir).backbone.state_dict()
    got = AngleModel.from_pretrained(resumed.output_dir).backbone.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    with pytest.raises(ValueError, match="--batch-size 8; resume it with that"):
        fit(cfg(tmp_path / "b", save_steps=3, resume=True, batch_size=4))
    with pytest.raises(ValueError, match="group-by-length"):
        fit(cfg(tmp_path / "c", group_by_length=True))
