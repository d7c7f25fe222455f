"""Distillation terms and the gate penalty: known values and loop references."""

import pytest
import torch
import torch.nn.functional as F

from dinorankclip.losses import gate_l1, gram_loss, relational_loss, text_align_loss


def test_gram_loss_zero_only_for_same_tokens():
    tokens = torch.randn(2, 5, 8)
    assert gram_loss([tokens], [tokens.clone()]).item() == pytest.approx(0.0, abs=1e-7)
    assert gram_loss([tokens], [torch.randn(2, 5, 8)]).item() > 0.01


def test_gram_loss_matches_loop():
    gen = torch.Generator().manual_seed(0)
    levels_s = [torch.randn(2, 4, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    levels_t = [torch.randn(2, 4, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    want = 0.0
    for student, teacher in zip(levels_s, levels_t, strict=True):
        level = 0.0
        for b in range(2):
            for i in range(4):
                for j in range(4):
                    gs = F.cosine_similarity(student[b, i], student[b, j], dim=0)
                    gt = F.cosine_similarity(teacher[b, i], teacher[b, j], dim=0)
                    level += (gs - gt) ** 2
        want += level / 32
    assert gram_loss(levels_s, levels_t).item() == pytest.approx(want.item() / 2, rel=1e-5)


def test_gram_loss_rejects_grid_mismatch():
    with pytest.raises(ValueError, match="same patch grid"):
        gram_loss([torch.randn(2, 4, 8)], [torch.randn(2, 9, 8)])


def test_teacher_gets_no_gradient():
    teacher = torch.randn(3, 4, 8, requires_grad=True)
    student = torch.randn(3, 4, 8, requires_grad=True)
    (gram_loss([student], [teacher]) + text_align_loss(student[:, 0], teacher[:, 0])).backward()
    relational_loss(student[:, 0], teacher[:, 0]).backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0


def test_relational_loss_matches_loop():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    teacher = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    s_hat, t_hat = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    want = 0.0
    for i in range(5):
        for j in range(5):
            if i != j:
                diff = (s_hat[i] - s_hat[j]).norm() - (t_hat[i] - t_hat[j]).norm()
                want += F.huber_loss(diff, torch.zeros(()), delta=0.1)
    assert relational_loss(student, teacher).item() == pytest.approx(want.item() / 20, rel=1e-6)


def test_relational_loss_equal_and_duplicate_features():
    feats = torch.randn(4, 6)
    feats[1] = feats[0]
    feats.requires_grad_(True)
    loss = relational_loss(feats, feats.detach().clone())
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(feats.grad).all()


def test_text_align_loss_known_values():
    vec = torch.randn(3, 5)
    assert text_align_loss(vec, 2 * vec).item() == pytest.approx(0.0, abs=1e-6)
    assert text_align_loss(vec, -vec).item() == pytest.approx(2.0, abs=1e-6)


def test_gate_l1_sums_mean_abs_of_each_gate():
    assert gate_l1(None, None) is None
    img_gate = torch.tensor([[0.5, -1.0], [0.0, 0.5]])
    assert gate_l1(img_gate, None).item() == pytest.approx(0.5)
    assert gate_l1(img_gate, torch.full((2, 3), 0.25)).item() == pytest.approx(0.75)
