"""Quantizers: nearest-code lookup, straight-through gradients, Eq. 3 of van den Oord et al. 2017,
the EMA update of its App. A.1, k-means init, dead-code restarts, the Gumbel-softmax relaxation of
DALL·E's dVAE, argument checks, state_dict round trips and codebook agreement over 2 gloo ranks."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from genlab.nn.quantizers import GumbelQuantizer, VectorQuantizer, perplexity


def flat(x: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) → (B·H·W, D)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def test_nearest_code_equals_brute_force():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=16, code_dim=3).eval()
    vq.embedding.data = torch.randn(16, 3)
    z_e = torch.randn(2, 3, 5, 4)
    out = vq(z_e)
    brute = torch.stack([((vq.embedding - z) ** 2).sum(1).argmin() for z in flat(z_e)])
    assert out.indices.shape == (2, 5, 4) and out.indices.dtype == torch.long
    assert torch.equal(out.indices.flatten(), brute)
    torch.testing.assert_close(flat(out.z_q), vq.embedding[brute])
    torch.testing.assert_close(vq.embed(out.indices), out.z_q)


def test_straight_through_gradient_is_identity():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=8, code_dim=4)
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    w = torch.randn(2, 4, 3, 3)
    (vq(z_e).z_q * w).sum().backward()
    torch.testing.assert_close(z_e.grad, w)


@pytest.mark.parametrize("ema", [False, True])
def test_loss_is_eq3(ema):
    """‖sg[z_e] − e‖² + β ‖z_e − sg[e]‖² (EMA: β term only), and each term's gradient goes to
    its own side: the codebook gets only the first, the encoder only the second."""
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=8, code_dim=4, beta=0.3, ema=ema).eval()
    vq.embedding.data = torch.randn(8, 4)
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z_e)
    e_k = vq.embedding.detach()[out.indices.flatten()]
    mse = ((flat(z_e.detach()) - e_k) ** 2).mean()
    torch.testing.assert_close(out.loss, mse * (0.3 if ema else 1.3))
    out.loss.backward()
    n = e_k.numel()
    torch.testing.assert_close(flat(z_e.grad), 0.3 * 2 * (flat(z_e.detach()) - e_k) / n)
    if not ema:
        expected = torch.zeros(8, 4).index_add_(
            0, out.indices.flatten(), 2 * (e_k - flat(z_e.detach())) / n
        )
        torch.testing.assert_close(vq.embedding.grad, expected)


def test_ema_update_equals_app_a1():
    """N ← γN + (1−γ)n, m ← γm + (1−γ)Σz, e = m / Laplace(N) on a batch with a known assignment."""
    gamma, eps = 0.9, 0.1  # a large ε, so that the smoothing shows
    vq = VectorQuantizer(num_codes=3, code_dim=2, ema=True, decay=gamma, eps=eps)
    e0 = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    vq.embedding.copy_(e0)
    vq.embed_sum.copy_(2 * e0)
    vq.cluster_size.copy_(torch.tensor([2.0, 2.0, 2.0]))
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0]])  # codes 0, 0, 1; code 2 unused
    out = vq.train()(z.T.reshape(1, 2, 3, 1))
    assert out.indices.flatten().tolist() == [0, 0, 1]
    n_new = gamma * 2 + (1 - gamma) * torch.tensor([2.0, 1.0, 0.0])
    m_new = gamma * 2 * e0 + (1 - gamma) * torch.tensor([[1.0, 1.0], [9.0, 1.0], [0.0, 0.0]])
    smoothed = (n_new + eps) / (n_new.sum() + 3 * eps) * n_new.sum()
    torch.testing.assert_close(vq.cluster_size, n_new)
    torch.testing.assert_close(vq.embed_sum, m_new)
    torch.testing.assert_close(vq.embedding, m_new / smoothed[:, None])
    assert not any(isinstance(p, torch.Tensor) for p in vq.parameters())  # buffers only
    # the loss of the batch is the commitment term against the codes *before* the update
    torch.testing.assert_close(out.loss, 0.25 * ((z - e0[[0, 0, 1]]) ** 2).mean())
    before = vq.embedding.clone()
    vq.eval()(z.T.reshape(1, 2, 3, 1))
    assert torch.equal(vq.embedding, before)  # no update in eval mode


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_are_restarted_on_data(ema):
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=8, code_dim=2, ema=ema, dead_code_threshold=1.0)
    far = torch.full((8, 2), 100.0)
    far[0] = 0.0
    vq.embedding.data.copy_(far)
    if ema:
        vq.embed_sum.copy_(far)
    z_e = torch.randn(4, 2, 4, 4)  # 64 points near the origin: only code 0 is used
    vq.train()(z_e)
    assert int(vq.restarts) == 7
    data = flat(z_e)
    distance_to_data = torch.cdist(vq.embedding[1:], data).min(dim=1).values
    torch.testing.assert_close(distance_to_data, torch.zeros(7))  # every restarted code is a point
    assert len({tuple(c.tolist()) for c in vq.embedding[1:]}) == 7  # drawn without replacement
    out = vq.eval()(z_e)
    assert torch.bincount(out.indices.flatten(), minlength=8)[1:].sum() > 0  # revived codes used


def test_no_restarts_when_threshold_is_zero():
    vq = VectorQuantizer(num_codes=8, code_dim=2)
    vq.embedding.data[1:] = 100.0
    vq.train()(torch.randn(2, 2, 4, 4))
    assert int(vq.restarts) == 0 and bool((vq.embedding[1:] == 100.0).all())


@pytest.mark.parametrize("ema", [False, True])
def test_kmeans_init_puts_one_code_on_each_blob(ema):
    torch.manual_seed(0)
    centers = torch.tensor([[10.0, 10.0], [-10.0, 10.0], [10.0, -10.0], [-10.0, -10.0]])
    points = (centers[:, None] + 0.1 * torch.randn(4, 64, 2)).reshape(256, 2)
    z_e = points.T.reshape(1, 2, 16, 16)
    vq = VectorQuantizer(num_codes=4, code_dim=2, ema=ema, kmeans_init=True, decay=0.9)
    assert not vq.kmeans_done
    vq.train()(z_e)
    assert vq.kmeans_done
    distance = torch.cdist(centers, vq.embedding).min(dim=1).values  # nearest code to each blob
    assert bool((distance < 0.1).all()), distance
    before = vq.embedding.clone()
    vq.train()(z_e)  # a second batch does not re-initialise: codes stay on the blob means
    torch.testing.assert_close(vq.embedding, before, atol=1e-4, rtol=0)


def test_kmeans_init_runs_in_training_only():
    vq = VectorQuantizer(num_codes=4, code_dim=2, kmeans_init=True).eval()
    before = vq.embedding.clone()
    vq(torch.randn(1, 2, 4, 4))
    assert not vq.kmeans_done and torch.equal(vq.embedding, before)


@pytest.mark.parametrize("ema", [False, True])
def test_l2_normalized_mode_uses_cosine_similarity(ema):
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=16, code_dim=4, l2_normalize=True, ema=ema, kmeans_init=True)
    z_e = 3 * torch.randn(2, 4, 4, 4)
    out = vq.train()(z_e)
    torch.testing.assert_close(vq.codebook.norm(dim=1), torch.ones(16))
    torch.testing.assert_close(out.z_q.norm(dim=1), torch.ones(2, 4, 4))
    out = vq.eval()(z_e)
    cosine = torch.nn.functional.normalize(flat(z_e), dim=1) @ vq.codebook.T
    assert torch.equal(out.indices.flatten(), cosine.argmax(dim=1))


def test_perplexity():
    assert math.isclose(float(perplexity(torch.full((8,), 5))), 8.0, rel_tol=1e-6)
    assert math.isclose(float(perplexity(torch.tensor([0, 7, 0, 0]))), 1.0, rel_tol=1e-6)
    vq = VectorQuantizer(num_codes=4, code_dim=2).eval()
    vq.embedding.data = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    z_e = vq.embedding.detach().repeat(2, 1).T.reshape(1, 2, 2, 4)  # each code used twice
    torch.testing.assert_close(vq(z_e).perplexity, torch.tensor(4.0))
    torch.testing.assert_close(vq(torch.zeros(1, 2, 2, 4) + 1).perplexity, torch.tensor(1.0))


def test_gumbel_hard_is_one_hot_forward_with_soft_gradients():
    torch.manual_seed(0)
    gq = GumbelQuantizer(num_codes=6, code_dim=3, hard=True).train()
    logits = torch.randn(2, 6, 3, 3, requires_grad=True)
    out = gq(logits, temperature=0.7, generator=torch.Generator().manual_seed(1))
    z_q = flat(out.z_q.detach())
    distance = torch.cdist(z_q, gq.embedding.detach()).min(dim=1).values
    torch.testing.assert_close(distance, torch.zeros(18), atol=1e-5, rtol=0)  # exactly a code
    (out.z_q * torch.randn_like(out.z_q)).sum().backward()
    assert logits.grad.abs().sum() > 0 and gq.embedding.grad.abs().sum() > 0


def test_gumbel_soft_sample_is_reproducible_and_a_mixture():
    gq = GumbelQuantizer(num_codes=6, code_dim=3).train()
    logits = torch.randn(1, 6, 2, 2)
    a = gq(logits, 1.0, generator=torch.Generator().manual_seed(3)).z_q
    b = gq(logits, 1.0, generator=torch.Generator().manual_seed(3)).z_q
    c = gq(logits, 1.0, generator=torch.Generator().manual_seed(4)).z_q
    assert torch.equal(a, b) and not torch.equal(a, c)
    distance = torch.cdist(flat(a), gq.embedding.detach()).min(dim=1).values
    assert bool((distance > 1e-3).all())  # a soft mixture of codes, not one code


def test_gumbel_kl_to_uniform():
    gq = GumbelQuantizer(num_codes=8, code_dim=2).eval()
    torch.testing.assert_close(gq(torch.zeros(2, 8, 3, 3), 1.0).loss, torch.tensor(0.0))
    one_hot = torch.full((2, 8, 3, 3), -1e4)
    one_hot[:, 5] = 1e4
    torch.testing.assert_close(gq(one_hot, 1.0).loss, torch.tensor(math.log(8)))
    logits = torch.randn(2, 8, 3, 3)
    q = logits.softmax(dim=1)
    expected = (q * (q * 8).log()).sum(1).mean()
    torch.testing.assert_close(gq(logits, 1.0).loss, expected)


def test_gumbel_eval_is_deterministic_argmax():
    gq = GumbelQuantizer(num_codes=5, code_dim=4).eval()
    logits = torch.randn(2, 5, 3, 3)
    a = gq(logits, 1.0, generator=torch.Generator().manual_seed(0))
    b = gq(logits, 0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.z_q, b.z_q)
    assert torch.equal(a.indices, logits.argmax(dim=1))
    torch.testing.assert_close(a.z_q, gq.embed(a.indices))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: VectorQuantizer(num_codes=1, code_dim=4), "num_codes=1"),
        (lambda: VectorQuantizer(num_codes=8, code_dim=0), "code_dim=0"),
        (lambda: VectorQuantizer(num_codes=8, code_dim=4, decay=1.0), "decay=1.0"),
        (lambda: VectorQuantizer(num_codes=8, code_dim=4, beta=-1), "beta=-1"),
        (lambda: VectorQuantizer(num_codes=8, code_dim=4, dead_code_threshold=-1), "threshold"),
        (lambda: VectorQuantizer(num_codes=8, code_dim=4, kmeans_iters=0), "kmeans_iters=0"),
        (lambda: GumbelQuantizer(num_codes=1, code_dim=4), "num_codes=1"),
        (lambda: VectorQuantizer(num_codes=8, code_dim=4)(torch.zeros(2, 4, 3)), "shape"),
        (lambda: VectorQuantizer(num_codes=8, code_dim=4)(torch.zeros(1, 3, 2, 2)), "code_dim=4"),
        (
            lambda: GumbelQuantizer(num_codes=8, code_dim=4)(torch.zeros(1, 4, 2, 2), 1.0),
            "num_codes=8",
        ),
        (
            lambda: GumbelQuantizer(num_codes=8, code_dim=4)(torch.zeros(1, 8, 2, 2), 0.0),
            "temperature",
        ),
        (lambda: VectorQuantizer(num_codes=8, code_dim=4).embed(torch.zeros(1, 2)), "(B, H, W)"),
        (
            lambda: VectorQuantizer(num_codes=8, code_dim=4).embed(torch.full((1, 1, 1), 8)),
            "[0, 8)",
        ),
    ],
)
def test_bad_arguments_raise_value_error(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_state_dict_round_trip_keeps_codebook_ema_state_and_kmeans_flag():
    torch.manual_seed(0)
    kwargs = dict(num_codes=8, code_dim=2, ema=True, kmeans_init=True, dead_code_threshold=0.5)
    vq = VectorQuantizer(**kwargs).train()
    vq(torch.randn(2, 2, 4, 4))
    vq(torch.randn(2, 2, 4, 4) + 5)  # some restarts
    state = vq.state_dict()
    assert {"embedding", "cluster_size", "embed_sum", "kmeans_done", "usage", "restarts"} <= set(
        state
    )
    restored = VectorQuantizer(**kwargs)
    restored.load_state_dict(state)
    for name, value in state.items():
        assert torch.equal(restored.state_dict()[name], value), name
    assert restored.kmeans_done
    # a resumed run does not re-initialise: the next step is an EMA step from the restored state
    z_e = torch.randn(2, 2, 4, 4)
    torch.manual_seed(1)
    vq(z_e)
    torch.manual_seed(1)
    restored.train()(z_e)
    assert torch.equal(restored.embedding, vq.embedding)


# ----------------------------------------------------------------------------------------------
# Two gloo ranks


def ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(100 + rank)  # different random choices on each rank
    data = torch.randn(2, 2, 2, 4, 4, generator=torch.Generator().manual_seed(0))  # (steps, ...)
    ema = VectorQuantizer(num_codes=8, code_dim=2, ema=True).train()
    full = VectorQuantizer(
        num_codes=8, code_dim=2, ema=True, kmeans_init=True, dead_code_threshold=2.0
    )
    ema.embedding.copy_(torch.randn(8, 2, generator=torch.Generator().manual_seed(1)))
    ema.embed_sum.copy_(ema.embedding)
    for step in range(3):
        batch = data[step % 2, rank : rank + 1] * (1 + step)  # each rank its own half
        ema(batch)
        full.train()(batch + 3 * rank)
    torch.save({"ema": ema.state_dict(), "full": full.state_dict()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_ranks_keep_one_codebook_equal_to_single_process(tmp_path: Path):
    """EMA on 2 ranks with different halves of a batch equals one process on the whole batch;
    with k-means init and restarts (random choices differ by rank) both ranks still agree."""
    mp.spawn(ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for model in ("ema", "full"):
        for name, value in r0[model].items():
            assert torch.equal(value, r1[model][name]), (model, name)
    assert r0["full"]["kmeans_done"] and int(r0["full"]["restarts"]) > 0
    data = torch.randn(2, 2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    single = VectorQuantizer(num_codes=8, code_dim=2, ema=True).train()
    single.embedding.copy_(torch.randn(8, 2, generator=torch.Generator().manual_seed(1)))
    single.embed_sum.copy_(single.embedding)
    for step in range(3):
        single(data[step % 2] * (1 + step))
    torch.testing.assert_close(r0["ema"]["embedding"], single.embedding)
    torch.testing.assert_close(r0["ema"]["cluster_size"], single.cluster_size)
