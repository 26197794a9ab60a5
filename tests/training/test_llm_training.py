"""Training LLMs: the seed's LLM recipe end to end on a tiny Llama (LoRA → merge → export →
encode → parity), adapters angle_emb can load, --dtype, --load-kbit, BiLLM, checkpointing."""

import json
import sys

import numpy as np
import pytest
import torch

import training.fit as fit_mod
from angle_rt import Encoder
from angle_rt.prompts import PROMPTS
from angle_torch.model import AngleModel
from exporters import export
from exporters.texts import builtin_sentences
from training.fit import TrainConfig, fit

TEXTS = ["a man is playing a guitar", "two dogs run in the snow", "the market fell today"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from tests.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def triples(tmp_path_factory):
    """48 (text, positive, negative) rows: NLI-like format B data."""
    s = builtin_sentences()
    path = tmp_path_factory.mktemp("data") / "triples.jsonl"
    path.write_text("".join(json.dumps({"text": s[i], "positive": s[i].lower() + " indeed",
                                        "negative": s[i + 300]}) + "\n" for i in range(48)))
    return path


def _recipe(model, data, out, **kw):
    """The seed's LLM recipe: Prompts.A, last pooling, cosine_w 0, ibn_w 1, cln_w 1,
    angle_w 0.02, LoRA."""
    base = dict(model=str(model), train_data=str(data), output_dir=str(out), lora=True,
                lora_r=8, lora_alpha=16, query_prompt="A", doc_prompt="A", pooling="last",
                cosine_w=0.0, ibn_w=1.0, cln_w=1.0, angle_w=0.02, batch_size=8, max_steps=3,
                warmup_steps=1, learning_rate=2e-3, logging_steps=1)
    base.update(kw)
    return TrainConfig(**base)


def test_llm_recipe_end_to_end(llama, triples, tmp_path, monkeypatch):
    checkpointed = []
    real = fit_mod._enable_checkpointing
    monkeypatch.setattr(fit_mod, "_enable_checkpointing",
                        lambda m: (checkpointed.append(True), real(m)))
    out = tmp_path / "run"
    res = fit(_recipe(llama, triples, out, merge=True))
    assert res.steps == 3 and checkpointed  # on by default for decoders
    # the adapter is saved as angle_emb saves LLM adapters: CAUSAL_LM, causal-LM key layout
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == str(llama)
    from safetensors.torch import load_file

    keys = list(load_file(out / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
    angle_cfg = json.loads((out / "angle_config.json").read_text())
    assert angle_cfg["default_prompt"] == PROMPTS["A"] and angle_cfg["pooling_strategy"] == "last"

    # export the adapter directory (base + merge), encode, parity with torch
    bundle = export(out, tmp_path / "bundle", verify_size=64)
    manifest = json.loads((bundle / "angle_rt.json").read_text())
    assert manifest["default_prompt"] == PROMPTS["A"] and manifest["pooling"] == "last"
    assert manifest["source"]["lora"]["task_type"] == "CAUSAL_LM"
    assert manifest["artifacts"][0]["parity"]["min_cosine"] >= 0.99999
    got = Encoder(bundle).encode(TEXTS)
    merged = AngleModel.from_pretrained(out / "merged").encode(TEXTS)
    assert np.allclose(got, merged, atol=1e-4)
    base = AngleModel.from_pretrained(llama, prompt="A").encode(TEXTS)
    assert not np.allclose(got, base, atol=1e-3)
    # angle_emb's LLM load path: AutoModelForCausalLM + PeftModel.from_pretrained(adapter),
    # hidden_states[-1] of the causal LM at the last token of the prompted text
    assert np.allclose(got, _angle_emb_style(llama, out, TEXTS), atol=1e-4)


def _angle_emb_style(base, adapter, texts):
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(base)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys")  # a no-op load
        lm = PeftModel.from_pretrained(lm, str(adapter)).eval()
    tok = AutoTokenizer.from_pretrained(base)
    rows = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(PROMPTS["A"].format(text=t))["input_ids"]])
            out = lm(input_ids=ids, output_hidden_states=True)
            rows.append(out.hidden_states[-1][0, -1].numpy())
    return np.stack(rows)


def test_angle_emb_adapter_trains_further(llama, triples, tmp_path):
    """--lora-path with an adapter angle_emb made (CAUSAL_LM, from AutoModelForCausalLM):
    its weights are loaded (not a fresh adapter) and it stays in that layout."""
    from tests.exporters.test_llm_adapters import make_adapter

    adapter = make_adapter(llama, tmp_path / "ae-adapter", "CAUSAL_LM")
    loaded = AngleModel.from_pretrained(llama, lora=adapter).encode(TEXTS, prompt="")
    out = tmp_path / "more"
    fit(_recipe(llama, triples, out, lora=False, lora_path=str(adapter), max_steps=1,
                learning_rate=1e-6))
    again = AngleModel.from_pretrained(out).encode(TEXTS, prompt="")
    assert np.allclose(again, loaded, atol=1e-2)  # 1 tiny step from the loaded adapter
    plain = AngleModel.from_pretrained(llama).encode(TEXTS, prompt="")
    assert not np.allclose(again, plain, atol=1e-2)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_dtype_bf16_loads_bf16_weights(llama, triples, tmp_path, monkeypatch):
    seen = {}
    real = fit_mod._Trainer.run

    def spy(self):
        base = self.model.backbone.get_base_model()
        seen["dtype"] = base.embed_tokens.weight.dtype
        return real(self)

    monkeypatch.setattr(fit_mod._Trainer, "run", spy)
    res = fit(_recipe(llama, triples, tmp_path / "bf16", dtype="bf16", max_steps=1,
                      gradient_checkpointing=False))
    assert res.steps == 1 and seen["dtype"] == torch.bfloat16


def test_refusals(llama, triples, tmp_path):
    with pytest.raises(ValueError, match="fp16 trains only with --lora"):
        fit(_recipe(llama, triples, tmp_path / "a", lora=False, dtype="fp16"))
    with pytest.raises(ValueError, match="add --lora"):
        fit(_recipe(llama, triples, tmp_path / "b", lora=False, load_kbit=4))
    with pytest.raises(ValueError, match="4 or 8"):
        fit(_recipe(llama, triples, tmp_path / "c", load_kbit=2))


def test_kbit_refused_clearly_without_bitsandbytes(llama, triples, tmp_path, monkeypatch,
                                                   capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    code = fit_mod.main(["--model", str(llama), "--train-data", str(triples), "--output-dir",
                         str(tmp_path / "k"), "--lora", "--load-kbit", "4"])
    err = capsys.readouterr().err
    assert code == 2
    assert "bitsandbytes" in err and "CUDA GPU" in err and "pip install" in err


def test_kbit_refused_where_it_cannot_quantize(monkeypatch):
    """bitsandbytes present but without a backend for the device."""
    import types

    fake = types.ModuleType("bitsandbytes.functional")

    def fail(*a, **k):
        raise RuntimeError("no kernel for this device")

    fake.quantize_4bit = fake.int8_vectorwise_quant = fail
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", fake)
    with pytest.raises(ValueError, match="cannot quantize on cpu here"):
        fit_mod.kbit_config(4, torch.device("cpu"))


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_and_merges_from_the_float_base(llama, triples, tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / f"q{bits}"
    res = fit(_recipe(llama, triples, out, load_kbit=bits, max_steps=2, merge=True))
    assert res.steps == 2
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM"
    # merged/ is the fp32 base + adapter, not dequantized k-bit weights
    merged = AngleModel.from_pretrained(out / "merged")
    assert merged.backbone.embed_tokens.weight.dtype == torch.float32
    assert np.allclose(merged.encode(TEXTS), AngleModel.from_pretrained(out).encode(TEXTS),
                       atol=1e-5)
    bundle = export(out, tmp_path / "bundle", verify_size=32)
    assert np.allclose(Encoder(bundle).encode(TEXTS), merged.encode(TEXTS), atol=1e-4)


def test_billm_training_is_saved_and_exported(llama, triples, tmp_path):
    out = tmp_path / "bellm"
    fit(_recipe(llama, triples, out, billm_start=0, max_steps=1))
    cfg = json.loads((out / "angle_config.json").read_text())
    assert cfg["apply_billm"] is True and cfg["billm_start_index"] == 0
    torch_model = AngleModel.from_pretrained(out)
    assert torch_model.settings.billm_start == 0
    bundle = export(out, tmp_path / "bundle", verify_size=32)
    manifest = json.loads((bundle / "angle_rt.json").read_text())
    assert manifest["source"]["billm"]["start_layer"] == 0
    assert np.allclose(Encoder(bundle).encode(TEXTS), torch_model.encode(TEXTS), atol=1e-4)
    causal = AngleModel.from_pretrained(out, billm_start=-1).encode(TEXTS)
    assert not np.allclose(torch_model.encode(TEXTS), causal, atol=1e-3)


@pytest.fixture(scope="module")
def billm_adapter(llama, triples, tmp_path_factory):
    """A BiLLM LoRA run with avg pooling and prompt A (settings the base does not have)."""
    out = tmp_path_factory.mktemp("billm-run") / "adapter"
    fit(_recipe(llama, triples, out, billm_start=1, pooling="avg", max_steps=1, merge=True))
    return out


def test_lora_flag_loads_what_the_adapter_directory_loads(llama, billm_adapter, tmp_path):
    """`--model BASE --lora ADAPTER` is `--model ADAPTER`: the adapter's pooling, prompt
    and BiLLM apply (they were dropped: 0.47 cosine to the trained model, 0.07 with a
    prompt), in torch and in the exported bundle."""
    trained = AngleModel.from_pretrained(billm_adapter)
    flag = AngleModel.from_pretrained(llama, lora=billm_adapter)
    assert flag.settings == trained.settings
    assert trained.settings.pooling == "avg" and trained.settings.billm_start == 1
    want = trained.encode(TEXTS)
    assert np.allclose(flag.encode(TEXTS), want, atol=1e-6)
    bundle = export(llama, tmp_path / "b", lora=billm_adapter, verify=False)
    manifest = json.loads((bundle / "angle_rt.json").read_text())
    assert manifest["pooling"] == "avg" and manifest["default_prompt"] == PROMPTS["A"]
    assert manifest["source"]["billm"]["start_layer"] == 1
    with Encoder(bundle) as enc:
        assert np.allclose(enc.encode(TEXTS), want, atol=1e-4)


def test_a_new_adapter_on_an_adapter_directory_is_refused(billm_adapter, triples, tmp_path):
    """Its adapter is merged in memory, but the new one is saved against the base alone: the
    saved model lost the first adapter (0.48 cosine to what was trained)."""
    with pytest.raises(ValueError, match=r"is a LoRA adapter .*--lora-path"):
        fit(_recipe(billm_adapter, triples, tmp_path / "again"))
    assert not (tmp_path / "again").exists()


def test_a_billm_model_writes_no_sentence_transformers_modules(billm_adapter):
    """sentence-transformers runs a decoder causally: its vectors were 0.84 from AnglE's."""
    for out in (billm_adapter, billm_adapter / "merged"):
        assert (out / "angle_config.json").exists()
        assert not (out / "modules.json").exists()
