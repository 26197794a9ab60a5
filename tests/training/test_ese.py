"""ESE and Matryoshka loss terms against hand-computed values on tiny tensors."""

import math

import numpy as np
import pytest
import torch

from training.ese import EseLoss, distill, matryoshka_loss, pca_compress


def _sq(v: torch.Tensor) -> torch.Tensor:  # a stand-in objective that is easy to sum by hand
    return v.pow(2).mean()


def _mean_pool(h: torch.Tensor) -> torch.Tensor:
    return h.mean(dim=1)


def _hidden(n_layers: int, seed: int = 0, grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 6, generator=g).requires_grad_(grad) for _ in range(n_layers + 1)]


def test_distill_is_mse_plus_t_times_kl():
    x = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]])
    y = torch.tensor([[1.0, 0.0, 1.5], [-0.5, 0.1, 0.4]])
    t = 2.0
    xs, ys = x.numpy() / t, y.numpy() / t
    p = np.exp(ys) / np.exp(ys).sum(1, keepdims=True)  # teacher
    logq = xs - np.log(np.exp(xs).sum(1, keepdims=True))  # student
    kl = (p * (np.log(p) - logq)).sum() / len(x)
    expected = ((x - y).pow(2).mean().item()) + t * kl
    assert distill(x, y, t).item() == pytest.approx(expected, rel=1e-6)
    assert distill(x, y, 0.0).item() == pytest.approx((x - y).pow(2).mean().item())


def test_pca_target_is_angle_embs_low_rank_projection():
    """m·U·diag(S), U, S from svd_lowrank(softmax(mᵀm/√D), q=k): the randomized solver
    angle_emb uses (so replayed with the same seed), no gradient. It is a coarse estimate
    (niter=2): its singular values can only undershoot the exact ones."""
    m = torch.randn(16, 6, generator=torch.Generator().manual_seed(0)).requires_grad_()
    torch.manual_seed(3)
    got = pca_compress(m, 2)
    a = torch.softmax(m.detach().T @ m.detach() / 6 ** 0.5, dim=-1)
    torch.manual_seed(3)
    u, s, _ = torch.svd_lowrank(a, q=2)
    torch.testing.assert_close(got, m.detach() @ (u @ torch.diag(s)))
    assert got.shape == (16, 2) and not got.requires_grad
    _, exact_s, _ = torch.linalg.svd(a)
    assert (s <= exact_s[:2] + 1e-5).all()  # a projection never overestimates them


@pytest.mark.parametrize(("layers", "weight"), [("angle_emb", 1.0), ("transformer", 1.0),
                                               ("transformer", 5.0)])
def test_ese_sum_without_pca_by_hand(layers, weight):
    n, k = 4, 2
    hidden = _hidden(n)
    got = EseLoss(compression=k, pca=False, layers=layers, layer_weight=weight)(
        hidden, _mean_pool, _sq)
    pooled = [_mean_pool(h) for h in hidden]
    expected = _sq(pooled[n]) + _sq(pooled[n][:, :k])
    indices = range(0, n - 1) if layers == "angle_emb" else range(1, n)
    expected += weight * sum(_sq(pooled[i][:, :k]) / (1 + math.log(1 + i))
                             for i in indices) / (n - 1)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_ese_with_pca_adds_the_distillation_terms():
    n, k, t = 3, 3, 1.5
    hidden = _hidden(n, seed=1)
    torch.manual_seed(7)
    got = EseLoss(compression=k, kl_temperature=t)(hidden, _mean_pool, _sq)
    torch.manual_seed(7)  # svd_lowrank is randomized: replay the same draws in order
    pooled = [_mean_pool(h) for h in hidden]
    expected = _sq(pooled[n]) + _sq(pooled[n][:, :k]) + distill(
        pooled[n][:, :k], pca_compress(pooled[n], k), t)
    layer_terms = 0.0
    for i in range(n - 1):
        term = _sq(pooled[i][:, :k]) + distill(pooled[i][:, :k], pca_compress(pooled[i], k), t)
        layer_terms = layer_terms + term / (1 + math.log(1 + i))
    expected = expected + layer_terms / (n - 1)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_which_layers_learn_angle_emb_vs_transformer():
    """angle_emb trains the embedding output and skips the second-to-last layer."""
    n = 4
    for layers, no_grad in (("angle_emb", n - 1), ("transformer", 0)):
        hidden = _hidden(n, grad=True)
        EseLoss(compression=2, pca=False, layers=layers)(hidden, _mean_pool, _sq).backward()
        assert hidden[no_grad].grad is None
        assert all(h.grad is not None for i, h in enumerate(hidden) if i != no_grad)


def test_compression_wider_than_the_model_uses_every_dim_and_bad_settings_raise():
    hidden = _hidden(2)
    wide = EseLoss(compression=1000, pca=False)(hidden, _mean_pool, _sq)
    full = EseLoss(compression=6, pca=False)(hidden, _mean_pool, _sq)
    assert wide.item() == pytest.approx(full.item())
    with pytest.raises(ValueError, match="ESE layers"):
        EseLoss(layers="all")
    with pytest.raises(ValueError, match="compression size"):
        EseLoss(compression=0)
    with pytest.raises(ValueError, match="layer weight"):
        EseLoss(layer_weight=-1)


def test_matryoshka_loss_sums_the_leading_slices():
    v = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    got = matryoshka_loss(v, [2, 4, 6], _sq)
    assert got.item() == pytest.approx((_sq(v[:, :2]) + _sq(v[:, :4])).item())
    with pytest.raises(ValueError, match=r"outside 1\.\.6"):
        matryoshka_loss(v, [8], _sq)


def test_fit_with_ese_and_matryoshka_runs_and_moves_every_layer(tiny_bert_dir, shared_data,
                                                                tmp_path):
    """--ese trains the shallow layers through their own terms: the first layer's weights
    move further than in a plain run with the same seed and data."""
    from transformers import AutoModel

    from training.fit import TrainConfig, fit

    data = tmp_path / "t.jsonl"
    lines = (shared_data / "sts" / "stsb-train.jsonl").read_text().splitlines()[:64]
    data.write_text("\n".join(lines) + "\n")
    base = dict(model=str(tiny_bert_dir), train_data=str(data),
                column_rename="sentence1:text1,sentence2:text2,score:label", batch_size=16,
                max_steps=3, warmup_steps=0, learning_rate=1e-3, cosine_w=1.0, seed=0)
    plain = fit(TrainConfig(**base, output_dir=str(tmp_path / "plain")))
    ese = fit(TrainConfig(**base, output_dir=str(tmp_path / "ese"), ese=True,
                          ese_compression_size=8, matryoshka_dims="8,16"))
    assert plain.steps == ese.steps == 3
    start = AutoModel.from_pretrained(tiny_bert_dir).state_dict()
    name = "encoder.layer.0.attention.self.query.weight"

    def moved(out):
        return (AutoModel.from_pretrained(out).state_dict()[name] - start[name]).abs().sum()

    assert moved(ese.output_dir) != moved(plain.output_dir)
    with pytest.raises(ValueError, match="matryoshka-dims"):
        fit(TrainConfig(**base, output_dir=str(tmp_path / "bad"), matryoshka_dims="8,x"))


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_layer_states_are_what_the_depth_cut_computes(arch, tiny_bert_dir, tiny_llama_dir):
    """ESE trains each layer's pooled states as the depth-k variant; the variant is the
    model cut after k layers. For a decoder, Hugging Face applies the final norm to the last
    layer's states only: the cut applies it after layer k, so the states ESE pools must
    have it too (a trained, non-unit norm weight made them 0.91 cosine apart)."""
    from angle_torch.depth import cut_model
    from angle_torch.model import AngleModel

    model = AngleModel.from_pretrained(tiny_llama_dir if arch == "llama" else tiny_bert_dir)
    if arch == "llama":
        with torch.no_grad():
            model.backbone.norm.weight.uniform_(0.5, 1.5)
    batch = model.tokenizer.encode(["A man plays a guitar.", "Snow falls."])
    from angle_torch.model import pad_ids

    ids, mask = pad_ids(batch, model.pad_token_id, model.settings.padding_side)
    with torch.no_grad():
        states = model.hidden_states(ids, mask)
        cut = cut_model(model, 1).backbone(input_ids=ids, attention_mask=mask)
    assert torch.allclose(states[1], cut.last_hidden_state, atol=1e-5)
