"""BiLLM / BeLLM: layers ≥ k attend bidirectionally, in torch, in training and in the
exported graph; checked against an independent torch implementation of the masking."""

import json

import numpy as np
import pytest
import torch

from angle_rt import Encoder

TEXTS = ["Summarize sentence \"a cat sat on the mat\" in one word:\"", "short one",
         "The representative word for sentence the weather is nice today is:\"",
         "x", "a somewhat longer sentence, so that the batch pads the others on the left"]
LAYERS = 4


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    from tests.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("llama4"), num_layers=LAYERS)


def reference(model_dir, start, texts, pooling="last"):
    """Each text alone (no padding) through the plain transformers layers, called one by
    one with an explicit mask: causal below `start`, none from `start` on (billm's
    bidirectional layers); last token (or mean) of the final norm."""
    from transformers import AutoModel, AutoTokenizer

    m = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            n = ids.shape[1]
            h = m.embed_tokens(ids)
            pos = torch.arange(n)[None]
            pe = m.rotary_emb(h, pos)
            causal = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
            for i, layer in enumerate(m.layers):
                mask = None if start is not None and i >= start else causal
                h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
                h = h[0] if isinstance(h, tuple) else h
            h = m.norm(h)[0]
            out.append((h[-1] if pooling == "last" else h.mean(0)).numpy())
    return np.stack(out)


@pytest.mark.parametrize(("start", "pooling"), [(0, "last"), (1, "last"), (2, "last"),
                                               (None, "last"), (3, "mean")])
def test_torch_model_matches_independent_masking(llama4, start, pooling):
    from angle_torch.model import AngleModel

    model = AngleModel.from_pretrained(llama4, billm_start=-1 if start is None else start,
                                       attn_implementation="eager", pooling=pooling)
    got = model.encode(TEXTS, batch_size=8)  # one left-padded batch
    assert np.allclose(got, reference(llama4, start, TEXTS, pooling), atol=1e-5)
    if start is not None:
        assert not np.allclose(got, reference(llama4, None, TEXTS, pooling), atol=1e-3)


def test_last_layer_alone_leaves_last_token_pooling_unchanged(llama4):
    """Only the last layer bidirectional (BiLLM_START_INDEX = n − 1, angle_emb's BeLLM
    example on Llama-2-7B is 31 of 32): the last token already saw every token in that
    layer, so `last` pooling gives the causal vectors; other tokens' states change."""
    from angle_torch.model import AngleModel

    bi = AngleModel.from_pretrained(llama4, billm_start=LAYERS - 1)
    causal = AngleModel.from_pretrained(llama4)
    assert np.allclose(bi.encode(TEXTS), causal.encode(TEXTS), atol=1e-5)


def test_sdpa_and_eager_agree(llama4):
    from angle_torch.model import AngleModel

    eager = AngleModel.from_pretrained(llama4, billm_start=1, attn_implementation="eager")
    sdpa = AngleModel.from_pretrained(llama4, billm_start=1, attn_implementation="sdpa")
    assert np.allclose(eager.encode(TEXTS), sdpa.encode(TEXTS), atol=1e-5)
    assert np.allclose(eager.encode(TEXTS[:1]), sdpa.encode(TEXTS[:1]), atol=1e-5)  # no pad


@pytest.mark.parametrize("start", [0, 2])
def test_exported_graph_carries_the_mask(capsys, llama4, tmp_path, start):
    from exporters.cli import main

    code = main(["--model", str(llama4), "-o", str(tmp_path / "b"), "-q",
                 "--billm-start", str(start), "--verify-size", "48"])
    assert code == 0, capsys.readouterr().err
    got = Encoder(tmp_path / "b").encode(TEXTS)
    assert np.allclose(got, reference(llama4, start, TEXTS), atol=1e-4)
    manifest = json.loads((tmp_path / "b" / "angle_rt.json").read_text())
    billm = manifest["source"]["billm"]
    assert billm["start_layer"] == start
    assert billm["bidirectional_layers"] == list(range(start, LAYERS))
    assert manifest["artifacts"][0]["parity"]["min_cosine"] >= 0.99999


def test_settings_round_trip_and_angle_emb_configs(llama4, tmp_path, monkeypatch):
    from angle_torch.model import AngleModel

    model = AngleModel.from_pretrained(llama4, billm_start=2)
    saved = model.save_pretrained(tmp_path / "saved")
    cfg = json.loads((saved / "angle_config.json").read_text())
    assert cfg["apply_billm"] is True and cfg["billm_start_index"] == 2
    again = AngleModel.from_pretrained(saved)
    assert again.settings.billm_start == 2
    assert np.allclose(again.encode(TEXTS), model.encode(TEXTS), atol=1e-6)
    # angle_emb writes apply_billm but keeps the index in billm's environment variable
    del cfg["billm_start_index"]
    (saved / "angle_config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("BiLLM_START_INDEX", "3")
    assert AngleModel.from_pretrained(saved).settings.billm_start == 3
    monkeypatch.delenv("BiLLM_START_INDEX")
    assert AngleModel.from_pretrained(saved).settings.billm_start == 0  # billm's default
    assert AngleModel.from_pretrained(saved, billm_start=-1).settings.billm_start is None


def test_bad_start_layers_are_refused(llama4, tiny_bert_dir):
    from angle_torch.model import AngleModel

    with pytest.raises(ValueError, match="outside 0…3"):
        AngleModel.from_pretrained(llama4, billm_start=4)
    with pytest.raises(ValueError, match="decoder"):
        AngleModel.from_pretrained(tiny_bert_dir, billm_start=0)


def _tiny_gpt2(out, padding_side):
    """GPT-2 passes each block its mask positionally and counts learned positions from the
    first column."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from tests.tiny_models import llama_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=800, n_embd=32, n_layer=3, n_head=4, n_positions=256,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(cfg).eval().save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=llama_tokenizer(), bos_token="<s>",
                            eos_token="</s>", pad_token="<pad>",
                            padding_side=padding_side).save_pretrained(out)
    return out


def test_gpt2_billm_takes_its_positional_mask_and_refuses_left_padding(tmp_path):
    """BiLLM on GPT-2 failed at its first forward (the mask came positionally); and with
    left padding its absolute positions shifted with the batch (0.48 cosine alone vs
    batched, BiLLM or not): refused like an encoder's."""
    from angle_torch.model import AngleModel
    from exporters import export

    with pytest.raises(ValueError, match="left padding is not supported for decoder model "
                                         "'gpt2'"):
        AngleModel.from_pretrained(_tiny_gpt2(tmp_path / "left", "left"))
    right = _tiny_gpt2(tmp_path / "right", "right")
    model = AngleModel.from_pretrained(right, billm_start=1, pooling="avg")
    batched = model.encode(TEXTS, batch_size=8)
    alone = np.concatenate([model.encode([t]) for t in TEXTS])
    assert np.allclose(batched, alone, atol=1e-5)
    causal = AngleModel.from_pretrained(right, billm_start=-1, pooling="avg").encode(TEXTS)
    assert not np.allclose(batched, causal, atol=1e-3)
    bundle = export(right, tmp_path / "b", billm_start=1, pooling="avg", verify=False)
    with Encoder(bundle) as enc:
        assert np.allclose(enc.encode(TEXTS), alone, atol=1e-5)
