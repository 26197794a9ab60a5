"""Where AngleModel's settings come from, and that a saved model exports as saved."""

import json
import shutil

import numpy as np
import pytest

from angle_rt import Encoder
from angle_torch.model import AngleModel
from angle_torch.settings import ANGLE_CONFIG_FILE
from exporters import export


def test_sentence_transformers_files_are_read(minilm_model):
    s = minilm_model.settings
    assert (s.pooling, s.max_length, s.normalize, s.is_decoder) == ("mean", 256, True, False)


def test_explicit_arguments_win(minilm_dir):
    m = AngleModel.from_pretrained(minilm_dir, pooling="cls_avg", max_length=32, prompt="C")
    assert (m.settings.pooling, m.settings.max_length) == ("cls_avg", 32)
    assert m.settings.default_prompt.endswith("passages: {text}")


def test_max_length_past_the_position_table_is_refused(tiny_bert_dir):
    # it exported, then failed on every text past 128 tokens inside ONNX Runtime
    with pytest.raises(ValueError, match=r"max_length 200 exceeds .*\(128\)"):
        AngleModel.from_pretrained(tiny_bert_dir, max_length=200)
    assert AngleModel.from_pretrained(tiny_bert_dir, max_length=128).settings.max_length == 128


def test_defaults_without_any_saved_settings(tiny_bert_dir):
    s = AngleModel.from_pretrained(tiny_bert_dir).settings
    # angle_emb's from_pretrained default; 128 = the tiny config's max_position_embeddings
    assert (s.pooling, s.max_length, s.padding_side) == ("cls", 128, "right")


def test_saved_angle_config_is_read_back_and_exported(tiny_bert_dir, tmp_path):
    m = AngleModel.from_pretrained(tiny_bert_dir, pooling="cls_max", max_length=40)
    m.settings.prompts["query"] = "query: {text}"
    m.settings.default_prompt = "query: {text}"
    saved = m.save_pretrained(tmp_path / "trained")
    cfg = json.loads((saved / ANGLE_CONFIG_FILE).read_text())
    assert cfg["pooling_strategy"] == "cls_max" and cfg["tokenizer_padding_side"] == "right"
    again = AngleModel.from_pretrained(saved)
    assert (again.settings.pooling, again.settings.max_length) == ("cls_max", 40)
    bundle = Encoder(export(saved, tmp_path / "bundle"))
    assert bundle.manifest.pooling == "cls_max" and bundle.max_length == 40
    assert bundle.manifest.prompts == {"query": "query: {text}"}
    text = "what is the capital of France"
    assert np.allclose(bundle.encode(text, prompt_name="query"), bundle.encode(text), atol=1e-6)
    assert np.allclose(bundle.encode(text), m.encode(text), atol=1e-5)


def test_angle_emb_config_keys_are_understood(tiny_bert_dir, tmp_path):
    d = shutil.copytree(tiny_bert_dir, tmp_path / "m")
    (d / ANGLE_CONFIG_FILE).write_text(json.dumps({
        "model_name_or_path": "x", "pooling_strategy": "cls_avg", "max_length": 50,
        "tokenizer_padding_side": None, "is_llm": False, "apply_lora": False}))
    s = AngleModel.from_pretrained(d).settings
    assert (s.pooling, s.max_length, s.padding_side) == ("cls_avg", 50, "right")


def test_unsupported_sentence_transformers_modules_are_refused(minilm_dir, tmp_path):
    d = shutil.copytree(minilm_dir, tmp_path / "st")
    modules = json.loads((d / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense",
                    "type": "sentence_transformers.models.Dense"})
    (d / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"\['Dense'\] have no AnglE equivalent"):
        AngleModel.from_pretrained(d)


def test_ambiguous_sentence_transformers_pooling_is_refused(minilm_dir, tmp_path):
    d = shutil.copytree(minilm_dir, tmp_path / "st")
    cfg_path = d / "1_Pooling" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pooling_mode_mean_sqrt_len_tokens"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="pass --pooling"):
        AngleModel.from_pretrained(d)
    assert AngleModel.from_pretrained(d, pooling="mean").settings.pooling == "mean"


def _st_dir(tiny_bert_dir, out, pooling: dict, sbert: dict | None = None,
            prompts: dict | None = None):
    """The tiny BERT as a sentence-transformers directory with these module configs."""
    d = shutil.copytree(tiny_bert_dir, out)
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps(
        {"embedding_dimension": 32, **pooling}))
    (d / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": 128, **(sbert or {})}))
    (d / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": prompts or {}, "default_prompt_name": next(iter(prompts or {}), None)}))
    return d


@pytest.mark.parametrize(("mode", "pooling"), [("mean", "mean"), ("cls", "cls"),
                                               ("lasttoken", "last"), (["max"], "max")])
def test_pooling_as_sentence_transformers_5_writes_it(tiny_bert_dir, tmp_path, mode, pooling):
    d = _st_dir(tiny_bert_dir, tmp_path / "st", {"pooling_mode": mode, "include_prompt": True})
    assert AngleModel.from_pretrained(d).settings.pooling == pooling



@pytest.mark.parametrize("pooling", [{}, {"pooling_mode_cls_token": False,
                                          "pooling_mode_mean_tokens": False}])
def test_pooling_config_naming_no_mode_is_mean(tiny_bert_dir, tmp_path, pooling):
    """sentence-transformers reads a Pooling config that names no mode (no key, or every
    legacy flag false) as mean; it was refused ("pooling [] has no single equivalent")."""
    from sentence_transformers import SentenceTransformer

    d = _st_dir(tiny_bert_dir, tmp_path / "st", pooling)
    assert AngleModel.from_pretrained(d).settings.pooling == "mean"
    assert SentenceTransformer(str(d), device="cpu")[1].pooling_mode == "mean"


def test_a_model_without_tokenizer_files_is_refused(tiny_bert_dir, tmp_path):
    """transformers builds a tokenizer of 5 special tokens: every word was [UNK], the gate
    passed (torch and the bundle agree) and 'hello world' and 'purple elephant' had one
    vector."""
    d = shutil.copytree(tiny_bert_dir, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        (d / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"tokenizer has 5 tokens .* no tokenizer files"):
        AngleModel.from_pretrained(d)

def test_unmappable_sentence_transformers_5_pooling_is_refused(tiny_bert_dir, tmp_path):
    for i, mode in enumerate(["weightedmean", ["mean", "max"]]):
        d = _st_dir(tiny_bert_dir, tmp_path / f"st{i}", {"pooling_mode": mode})
        with pytest.raises(ValueError, match="pass --pooling"):
            AngleModel.from_pretrained(d)


def test_pooling_without_prompt_tokens_is_refused(tiny_bert_dir, tmp_path):
    """include_prompt: false leaves the prompt's tokens out of the mean, which AnglE
    pooling cannot: refused, not a bundle 0.97 away from SentenceTransformer.encode."""
    d = _st_dir(tiny_bert_dir, tmp_path / "st", {"pooling_mode": "mean",
                                                  "include_prompt": False},
                prompts={"query": "query: "})
    with pytest.raises(ValueError, match="include_prompt: false"):
        AngleModel.from_pretrained(d)
    plain = _st_dir(tiny_bert_dir, tmp_path / "plain",
                    {"pooling_mode": "mean", "include_prompt": False})  # no prompt: the same
    assert AngleModel.from_pretrained(plain).settings.pooling == "mean"


def test_do_lower_case_lowercases_in_torch_and_in_the_bundle(tiny_bert_dir, tmp_path):
    """A cased tokenizer under do_lower_case: sentence-transformers lowercases each text
    first; so do the torch model and the exported tokenizer (they read `Kittens` as [UNK])."""
    from sentence_transformers import SentenceTransformer

    d = _st_dir(tiny_bert_dir, tmp_path / "st", {"pooling_mode": "mean"},
                sbert={"do_lower_case": True})
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["normalizer"]["lowercase"] = False  # a cased tokenizer
    (d / "tokenizer.json").write_text(json.dumps(tok))
    texts = ["Kittens PLAY in the Garden.", "ÉCOLE Straße İstanbul"]
    ref = SentenceTransformer(str(d), device="cpu").encode(texts)
    model = AngleModel.from_pretrained(d)
    assert np.allclose(model.encode(texts), ref, atol=1e-5)
    bundle = export(d, tmp_path / "b", verify=False)
    with Encoder(bundle, precision="fp32") as enc:
        assert np.allclose(enc.encode(texts), ref, atol=1e-5)
        assert enc.tokenizer.encode(texts) == enc.tokenizer.encode([t.lower() for t in texts])
