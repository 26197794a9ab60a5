"""LoRA adapters as angle_emb and peft save them for LLMs (CAUSAL_LM, saved from
AutoModelForCausalLM: keys under base_model.model.model.layers...), merged onto the
headless backbone the exporter traces; adapters that do not fit the base are refused."""

import json

import numpy as np
import pytest
import torch

from angle_rt import Encoder
from exporters.cli import main

TEXTS = ["the adapter changes this", "and this too", "a third, somewhat longer sentence"]


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tests.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("llama"))


def make_adapter(base, out, task_type, head: bool = True, layers=None, seed=1):
    """A peft LoRA adapter with non-zero B (so it changes the vectors), saved by peft from
    AutoModelForCausalLM (`head`) or AutoModel, with the given task type."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if head else AutoModel
    kw = {"num_hidden_layers": layers} if layers else {}
    model = cls.from_pretrained(base, **kw)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     task_type=task_type)
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    peft_model.save_pretrained(out)
    return out


def reference_vectors(base, adapter, texts, head: bool = True):
    """Independent reference: peft merge_and_unload on the model class the adapter was
    saved from (the causal LM, or the bare model), then the inner model's last hidden state
    at the last token, one unpadded text at a time."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    lm = (AutoModelForCausalLM if head else AutoModel).from_pretrained(base,
                                                                       dtype=torch.float32)
    if adapter is not None:
        lm = PeftModel.from_pretrained(lm, str(adapter)).merge_and_unload()
    lm.eval()
    tok = AutoTokenizer.from_pretrained(base)
    rows = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            inner = lm.model if head else lm
            hidden = inner(input_ids=ids).last_hidden_state
            rows.append(hidden[0, -1].numpy())
    return np.stack(rows)


@pytest.mark.parametrize(("task_type", "head"), [("CAUSAL_LM", True), (None, True),
                                                 ("FEATURE_EXTRACTION", False)])
def test_llm_adapter_is_applied_on_export(capsys, llama_dir, tmp_path, task_type, head):
    """A CAUSAL_LM adapter (angle_emb's LLM layout) must change the exported vectors and
    equal peft's own merge on the causal LM; so must a task-less one saved from the causal
    LM and a FEATURE_EXTRACTION one saved from the bare model."""
    adapter = make_adapter(llama_dir, tmp_path / "adapter", task_type, head)
    code, _, err = _run(capsys, "--model", llama_dir, "--lora", adapter, "-o", tmp_path / "b",
                        "-q", "--verify-size", 64)
    assert code == 0, err
    got = Encoder(tmp_path / "b").encode(TEXTS)
    base = reference_vectors(llama_dir, None, TEXTS)
    ref = reference_vectors(llama_dir, adapter, TEXTS, head)
    assert not np.allclose(got, base, atol=1e-3), "the adapter was not applied"
    assert np.allclose(got, ref, atol=1e-4)
    source = json.loads((tmp_path / "b" / "angle_rt.json").read_text())["source"]
    assert source["lora"]["matched_tensors"] == 12 and source["lora"]["task_type"] == (
        task_type or None)


def test_adapter_directory_as_model(capsys, llama_dir, tmp_path):
    """`--model ADAPTER_DIR` (what angle_emb publishes) loads its base and merges."""
    adapter = make_adapter(llama_dir, tmp_path / "adapter", "CAUSAL_LM")
    code, _, err = _run(capsys, "--model", adapter, "-o", tmp_path / "b", "-q",
                        "--verify-size", 32)
    assert code == 0, err
    ref = reference_vectors(llama_dir, adapter, TEXTS)
    assert np.allclose(Encoder(tmp_path / "b").encode(TEXTS), ref, atol=1e-4)


def test_adapter_for_another_base_is_refused(capsys, llama_dir, tmp_path):
    """An adapter trained on a 3-layer model has tensors for a layer the 2-layer base lacks:
    refused with counts, exit 2, nothing written."""
    adapter = make_adapter(llama_dir, tmp_path / "adapter", "CAUSAL_LM", layers=3)
    code, _, err = _run(capsys, "--model", llama_dir, "--lora", adapter, "-o", tmp_path / "b",
                        "-q", "--no-verify")
    assert code == 2
    assert "12 of 18" in err and "6 " in err and "layers.2" in err
    assert not (tmp_path / "b").exists()


def test_adapter_with_foreign_keys_is_refused(llama_dir, tmp_path):
    """Keys that match nothing in the base (renamed modules) are an error, never a warning
    and a no-op merge."""
    from safetensors.torch import load_file, save_file

    from angle_torch.lora import AdapterMismatchError
    from angle_torch.model import AngleModel

    adapter = make_adapter(llama_dir, tmp_path / "adapter", "CAUSAL_LM")
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({k.replace("self_attn", "attention"): v for k, v in weights.items()},
              adapter / "adapter_model.safetensors")
    with pytest.raises(AdapterMismatchError, match=r"4 of 12 .* matched"):
        AngleModel.from_pretrained(llama_dir, lora=adapter)


def test_adapter_with_wrong_shapes_is_refused(llama_dir, tmp_path):
    from angle_torch.lora import AdapterMismatchError
    from angle_torch.model import AngleModel
    from tests.tiny_models import build_tiny_llama

    wide = build_tiny_llama(tmp_path / "wide", hidden_size=64)
    adapter = make_adapter(wide, tmp_path / "adapter", "CAUSAL_LM")
    with pytest.raises(AdapterMismatchError, match="shape"):
        AngleModel.from_pretrained(llama_dir, lora=adapter)
