"""Every pooling strategy, traced into the graph, equals the torch pooler."""

import numpy as np
import pytest

from angle_rt import Encoder
from angle_torch.model import AngleModel
from exporters import export
from exporters.texts import builtin_sentences

TEXTS = [*builtin_sentences()[::9], "", "x", " ".join(builtin_sentences()[:30])]
STRATEGIES = ["cls", "cls_avg", "cls_max", "mean", "avg", "max", "last", 1]
CASES = ([("bert", s, "right") for s in STRATEGIES]
         + [("llama", s, "right") for s in STRATEGIES]
         + [("llama", "last", "left"), ("llama", "mean", "left"), ("bert", -1, "right"),
            ("llama", "cls", "left"), ("llama", 1, "left"), ("llama", "cls_avg", "left")])


@pytest.fixture(scope="module")
def model_dirs(tiny_bert_dir, tiny_llama_dir):
    return {"bert": tiny_bert_dir, "llama": tiny_llama_dir}


@pytest.mark.parametrize(("arch", "strategy", "side"), CASES,
                         ids=[f"{a}-{s}-{p}" for a, s, p in CASES])
def test_graph_equals_torch(model_dirs, tmp_path, arch, strategy, side):
    src = model_dirs[arch]
    texts = [t for t in TEXTS if t] if strategy == 1 else TEXTS
    bundle = export(src, tmp_path / "b", pooling=strategy, max_length=64, padding_side=side,
                    verify=False)  # the assertions below are the parity check
    torch_model = AngleModel.from_pretrained(src, pooling=strategy, max_length=64,
                                             padding_side=side)
    ref = torch_model.encode(texts, batch_size=16)
    enc = Encoder(bundle)
    assert enc.manifest.architecture == ("decoder" if arch == "llama" else "encoder")
    assert enc.manifest.padding_side == side
    assert max(len(r) for r in enc.tokenizer.encode(texts)) == 64  # one text at max_length
    for batch_size in (1, 16):
        got = enc.encode(texts, batch_size=batch_size)
        assert np.allclose(got, ref, atol=1e-5, rtol=1e-4), (batch_size, np.abs(got - ref).max())
    if strategy == 1 and arch == "llama":  # "" is just <s>: no token at index 1
        with pytest.raises(ValueError, match=r"sentences\[1\] is 1 tokens.*needs ≥ 2"):
            enc.encode(["fine", ""])


def test_decoder_defaults_to_last_token_and_its_padding_side(tiny_llama_dir):
    model = AngleModel.from_pretrained(tiny_llama_dir)
    assert model.settings.is_decoder and model.settings.pooling == "last"
    assert model.settings.padding_side == "left"
    assert type(model.backbone).__name__ == "LlamaModel"  # no LM head


def test_left_padding_refused_for_encoders(tiny_bert_dir):
    with pytest.raises(ValueError, match="left padding is not supported"):
        AngleModel.from_pretrained(tiny_bert_dir, padding_side="left")
