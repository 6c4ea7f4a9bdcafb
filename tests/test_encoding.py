import numpy as np
import pytest
import torch

from logitcache.encoding import FullEncoding, TopKEncoding, dense_log_probs, id_dtype, to_probs
from logitcache.errors import LogitcacheError
from logitcache.losses import kd_loss, kd_loss_dense


def _batch(enc, logits):
    t = enc.encode(logits)
    t["num_classes"] = torch.full((len(logits),), logits.shape[1])
    return t


def _kl(p, q):
    return (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(1)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 100, generator=g) * 3


def test_full_round_trip(logits):
    p = to_probs(_batch(FullEncoding(100), logits))
    assert torch.allclose(p, torch.softmax(logits, 1), atol=2e-3)


def test_topk_keeps_top_entries_and_tail_mass(logits):
    enc = TopKEncoding(100, 10)
    t = _batch(enc, logits)
    assert t["ids"].dtype == torch.int16
    p = to_probs(t)
    true = torch.softmax(logits, 1)
    top_true, ids = true.topk(10, 1)
    assert torch.equal(t["ids"].long(), ids)
    assert torch.allclose(p.gather(1, ids), top_true, rtol=2e-3, atol=1e-6)
    # the tail is kept, not renormalised away: mass outside the top k matches the teacher's
    assert torch.allclose(1 - p.gather(1, ids).sum(1), 1 - top_true.sum(1), atol=2e-3)
    assert torch.allclose(p.sum(1), torch.ones(64), atol=1e-5)
    kl_tail = _kl(true, p).mean().item()
    renorm = torch.zeros_like(true).scatter(1, ids, top_true / top_true.sum(1, keepdim=True))
    kl_renorm_rev = _kl(renorm, true).mean().item()
    print(f"KL(teacher || top-10 + uniform tail) = {kl_tail:.4f} nats; KL(renormalised top-10 || teacher) = "
          f"{kl_renorm_rev:.4f}")
    assert kl_tail < 0.25
    assert np.isfinite(kl_tail)


def test_topk_confident_teacher_tail_is_exact():
    logits = torch.tensor([[30.0, 0.0, -1.0, -2.0, 0.5]])
    t = _batch(TopKEncoding(5, 2), logits)
    true_tail = torch.softmax(logits, 1).sort(descending=True).values[0, 2:].sum()
    assert torch.allclose(t["tail"].exp(), true_tail, rtol=1e-4)


def test_topk_with_k_equal_classes(logits):
    p = to_probs(_batch(TopKEncoding(100, 100), logits))
    assert torch.allclose(p, torch.softmax(logits, 1), atol=2e-3)


@pytest.mark.parametrize("k", [0, 101])
def test_topk_rejects_bad_k(k):
    with pytest.raises(LogitcacheError, match="k must be"):
        TopKEncoding(100, k)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("k", [5, 100])
def test_sparse_kd_loss_equals_dense_kl_by_hand(logits, temperature, k):
    targets = _batch(TopKEncoding(100, k), logits)
    student = torch.randn(64, 100, generator=torch.Generator().manual_seed(1))
    log_p = dense_log_probs(targets, temperature)
    log_q = torch.log_softmax(student / temperature, 1)
    by_hand = temperature**2 * (log_p.exp() * (log_p - log_q)).sum(1).mean()
    assert torch.allclose(kd_loss(student, targets, temperature), by_hand, rtol=1e-4, atol=1e-5)


def test_kd_loss_full_and_gradient(logits):
    targets = _batch(FullEncoding(100), logits)
    student = torch.randn(64, 100, requires_grad=True)
    loss = kd_loss(student, targets, 2.0)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert torch.allclose(loss, kd_loss_dense(student, logits.half().float(), 2.0), atol=1e-5)
    assert kd_loss_dense(logits, logits, 2.0).abs() < 1e-5


def test_id_dtype():
    assert id_dtype(10) == np.int16 and id_dtype(32768) == np.int16 and id_dtype(40000) == np.int32
