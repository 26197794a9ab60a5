"""Each loss against a value computed by hand on a 2–3 pair batch."""

import math

import pytest
import torch

from training.losses import (
    AngleLoss,
    angle_loss,
    contrastive_loss,
    cosine_loss,
    distillation_loss,
    in_batch_negative_loss,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_cosine_loss_by_hand():
    # pair cosines 0.6, 0.8, 0.0 with labels 2, 1, 3; tau 1
    emb = t([[1, 0], [0.6, 0.8], [1, 0], [0.8, 0.6], [0, 1], [1, 0]])
    labels = t([2.0, 1.0, 3.0])
    # ordered pairs with y_i < y_j: (1,0): .8-.6, (1,2): .8-0, (0,2): .6-0
    expected = math.log(1 + math.exp(0.2) + math.exp(0.8) + math.exp(0.6))
    assert cosine_loss(labels, emb, tau=1.0).item() == pytest.approx(expected, rel=1e-9)
    # scale invariance: cosine only
    assert cosine_loss(labels, emb * 7.0, tau=1.0).item() == pytest.approx(expected, rel=1e-9)


def test_angle_loss_by_hand():
    # u0 = 1+2i, v0 = 3+4i: (ac+bd + bc-ad)/(|u||v|) = (11 + 2)/(√5·5)
    # u1 = 1+0i, v1 = 0+1i: (0 + (0-1))/1 → |−1| = 1
    emb = t([[1, 2], [3, 4], [1, 0], [0, 1]])
    labels = t([1.0, 0.0])
    s0, s1 = 13 / (5 * math.sqrt(5)), 1.0
    expected = math.log(1 + math.exp(s1 - s0))
    assert angle_loss(labels, emb, tau=1.0).item() == pytest.approx(expected, rel=1e-9)
    # mean pooling divides each score by D = 2 before ranking; tau scales the scores
    expected_mean = math.log(1 + math.exp(20 * (s1 - s0) / 2))
    got = angle_loss(labels, emb, tau=20.0, pooling="mean").item()
    assert got == pytest.approx(expected_mean, rel=1e-9)


def test_in_batch_negative_loss_by_hand():
    emb = t([[1, 0], [0.6, 0.8], [0, 1], [-1, 0]])
    labels = t([1.0, 0.0])  # only pair 0 has positives
    x = [[1, 0], [0.6, 0.8], [0, 1], [-1, 0]]
    tau = 2.0

    def row_loss(r, partner):
        sims = [tau * (x[r][0] * x[c][0] + x[r][1] * x[c][1]) for c in range(4) if c != r]
        cols = [c for c in range(4) if c != r]
        logz = math.log(sum(math.exp(s) for s in sims))
        return -(sims[cols.index(partner)] - logz)

    expected = (row_loss(0, 1) + row_loss(1, 0)) / 4  # rows 2, 3 add 0 but count
    got = in_batch_negative_loss(labels, emb, tau=tau).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_in_batch_negatives_take_only_the_partner_as_target():
    # angle_emb multiplies indices by integer labels, so label 2 at column 3 and label 3
    # at partner 2 collide (3·2 = 2·3) and add a second "positive"; ours targets the partner.
    torch.manual_seed(0)
    emb = torch.randn(6, 4, dtype=torch.float64)
    labels = t([1.0, 3.0, 2.0])
    x = torch.nn.functional.normalize(emb, dim=1)
    sim = (x @ x.T - torch.eye(6, dtype=torch.float64) * 1e12) * 20
    logp = torch.log_softmax(sim, dim=1)
    expected = -sum(logp[r, r ^ 1] for r in range(6)) / 6
    assert in_batch_negative_loss(labels, emb, 20).item() == pytest.approx(expected.item())


def test_contrastive_loss_by_hand():
    q = t([[1, 0], [0, 1]])
    p = t([[1, 0], [0.6, 0.8]])
    n = t([[0, 1], [1, 0]])
    tau = 1.0
    # query 0: candidates p0=1, p1=.6, n0=0, n1=1 → target p0; query 1: .0,.8,1,0 → p1
    l0 = -(1.0 - math.log(math.exp(1) + math.exp(0.6) + math.exp(0) + math.exp(1)))
    l1 = -(0.8 - math.log(math.exp(0) + math.exp(0.8) + math.exp(1) + math.exp(0)))
    assert contrastive_loss(q, p, n, tau).item() == pytest.approx((l0 + l1) / 2, rel=1e-9)
    l0 = -(1.0 - math.log(math.exp(1) + math.exp(0.6)))
    l1 = -(0.8 - math.log(math.exp(0) + math.exp(0.8)))
    assert contrastive_loss(q, p, None, tau).item() == pytest.approx((l0 + l1) / 2, rel=1e-9)


def test_distillation_by_hand():
    s, te = t([[1.0, 0.0, -1.0]]), t([[0.0, 2.0, 0.0]])
    for temp in (1.0, 2.0):
        ps = [math.exp(v / temp) for v in s[0].tolist()]
        pt = [math.exp(v / temp) for v in te[0].tolist()]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        kl = sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True)) * temp**2
        assert distillation_loss(s, te, temp).item() == pytest.approx(kl, rel=1e-9)


def test_angle_loss_combines_terms_per_format():
    torch.manual_seed(1)
    emb = torch.randn(6, 4, dtype=torch.float64)
    labels = t([0.5, 4.0, 2.5])
    f = AngleLoss(cosine_w=2.0, ibn_w=0.5, angle_w=0.1, cosine_tau=10, ibn_tau=5, angle_tau=3)
    expected = (2.0 * cosine_loss(labels, emb, 10) + 0.5 * in_batch_negative_loss(labels, emb, 5)
                + 0.1 * angle_loss(labels, emb, 3))
    assert f(emb, labels, "A").item() == pytest.approx(expected.item())
    # C: text, positive → only the contrastive term, weighted by ibn_w
    assert f(emb, None, "C").item() == pytest.approx(
        0.5 * contrastive_loss(emb[0::2], emb[1::2], tau=5).item())
    # B: triples → (ibn·CL(q,p) + cln·CL(q,p,n))/2 + angle/cosine over (q,p)=1, (q,n)=0
    q, p, n = emb[0::3], emb[1::3], emb[2::3]
    pairs = torch.stack([q[0], p[0], q[1], p[1], q[0], n[0], q[1], n[1]])
    lab = t([1, 1, 0, 0])
    expected = ((0.5 * contrastive_loss(q, p, tau=5) + 1.0 * contrastive_loss(q, p, n, tau=5)) / 2
                + 0.1 * angle_loss(lab, pairs, 3) + 2.0 * cosine_loss(lab, pairs, 10))
    assert f(emb, None, "B").item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="unknown dataset format"):
        f(emb, labels, "D")


def test_defaults_are_angle_emb_0_6_1():
    f = AngleLoss()
    assert (f.cosine_w, f.ibn_w, f.cln_w, f.angle_w) == (0.0, 1.0, 1.0, 0.02)
    assert (f.cosine_tau, f.ibn_tau, f.angle_tau, f.angle_pooling) == (20, 20, 20, "sum")
