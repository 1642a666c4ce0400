"""ResidualVQ: layouts, gradients, EMA training, partial decoding, autocast, and parity with
vector-quantize-pytorch. Runs on whatever backend `auto` picks for CPU."""

import pytest
import torch
from conftest import relative_error

from tinykern.nn.residual_vq import ResidualVQ

DIM, K, LEVELS = 8, 16, 3


@pytest.fixture(autouse=True)
def seeded():
    # k-means picks and code restarts draw from torch's global generator.
    torch.manual_seed(0)


def toy_batch(gen, n):
    """Two-scale clusters (16 coarse x 16 fine centres) plus a little noise: one level per
    scale, the third for the noise."""
    centres = torch.Generator().manual_seed(7)
    coarse = 4 * torch.randn(16, DIM, generator=centres)
    fine = torch.randn(16, DIM, generator=centres)
    a = torch.randint(0, 16, (n,), generator=gen)
    b = torch.randint(0, 16, (n,), generator=gen)
    return coarse[a] + fine[b] + 0.05 * torch.randn(n, DIM, generator=gen)


def train(rvq, gen, steps=60, n=512):
    rvq.train()
    losses = [rvq(toy_batch(gen, n))[2].item() for _ in range(steps)]
    return rvq.eval(), losses


def test_shapes_channels_last(gen):
    rvq = ResidualVQ(DIM, K, LEVELS)
    x = torch.randn(2, 5, 7, DIM, generator=gen)
    q, codes, loss = rvq(x)
    assert q.shape == x.shape and q.dtype == x.dtype
    assert codes.shape == (2, 5, 7, LEVELS) and codes.dtype == torch.int64
    assert loss.shape == () and loss.item() >= 0
    assert rvq.codebooks.shape == (LEVELS, K, DIM) and rvq.ema_cluster_size.shape == (LEVELS, K)
    assert torch.equal(rvq.encode(x), rvq.eval()(x)[1])
    with pytest.raises(ValueError, match="dim=8"):
        rvq(torch.randn(4, DIM + 1))


def test_channels_first_matches_channels_last(gen):
    nchw = ResidualVQ(DIM, K, LEVELS, channels_first=True)
    x = torch.randn(2, DIM, 4, 5, generator=gen)
    q, codes, _ = nchw(x)
    assert q.shape == x.shape and codes.shape == (2, 4, 5, LEVELS)
    nhwc = ResidualVQ(DIM, K, LEVELS)
    nhwc.load_state_dict(nchw.state_dict())
    q_last, codes_last, _ = nhwc.eval()(x.permute(0, 2, 3, 1))
    nchw.eval()
    assert torch.equal(nchw.encode(x), codes_last)
    assert torch.equal(nchw(x)[0], q_last.permute(0, 3, 1, 2))
    assert torch.equal(nchw.decode(codes_last), q_last.permute(0, 3, 1, 2))


def test_straight_through_gradient(gen):
    rvq = ResidualVQ(DIM, K, LEVELS)
    rvq(toy_batch(gen, 256))  # k-means init
    x = toy_batch(gen, 64).requires_grad_()
    q, _, loss = rvq(x)
    weight = torch.randn(q.shape, generator=gen)
    (q * weight).sum().backward()
    assert torch.equal(x.grad, weight)  # the identity through the quantizer
    x.grad = None
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the commitment loss pulls x


def test_training_converges_and_uses_codes(gen):
    # Random start: the restart rule has to bring every code into the data.
    rvq, losses = train(ResidualVQ(DIM, K, LEVELS, kmeans_init=False, decay=0.9, dead_code_threshold=1.0), gen)
    assert sum(losses[-5:]) / 5 < 0.25 * losses[0], losses
    codes = rvq.encode(toy_batch(gen, 2048))
    usage = [codes[:, lvl].unique().numel() / K for lvl in range(LEVELS)]
    assert min(usage) >= 0.5, usage


def test_kmeans_init_on_first_batch(gen):
    rvq = ResidualVQ(DIM, K, LEVELS, kmeans_iters=5)
    assert not rvq.initted
    x = toy_batch(gen, 512)
    rvq(x)
    assert rvq.initted and rvq.codebooks.abs().sum(-1).gt(0).all()
    # Coarse-to-fine right away: every level shrinks the residual of a fresh batch.
    y = toy_batch(gen, 512)
    codes = rvq.eval().encode(y)
    errors = [relative_error(rvq.decode(codes[:, :lvl]), y) for lvl in range(1, LEVELS + 1)]
    assert errors[0] < 0.5 and all(a > b for a, b in zip(errors, errors[1:])), errors


def test_partial_decode_improves_with_each_level(gen):
    rvq, _ = train(ResidualVQ(DIM, K, LEVELS, decay=0.9), gen, steps=30)
    x = toy_batch(gen, 1024)
    codes = rvq.encode(x)
    errors = [relative_error(rvq.decode(codes[:, :lvl]), x) for lvl in range(1, LEVELS + 1)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.2, errors
    assert torch.equal(rvq.decode(codes), rvq(x)[0])


def test_eval_is_deterministic_and_stateless(gen):
    rvq, _ = train(ResidualVQ(DIM, K, LEVELS, quantize_dropout=True), gen, steps=5)
    before = {k: v.clone() for k, v in rvq.state_dict().items()}
    x = toy_batch(gen, 300)
    first, second = rvq(x), rvq(x)
    assert torch.equal(first[1], second[1]) and torch.equal(first[0], second[0])
    assert (first[1] >= 0).all()  # no dropout in eval
    assert all(torch.equal(v, rvq.state_dict()[k]) for k, v in before.items())


def test_quantize_dropout_marks_dropped_levels(gen):
    rvq = ResidualVQ(DIM, K, 4, quantize_dropout=True)
    rvq(toy_batch(gen, 256))  # k-means init
    kept = set()
    for _ in range(20):
        books = rvq.codebooks.clone()  # the step's EMA update changes them
        q, codes, _ = rvq(toy_batch(gen, 64))
        levels = int((codes[0] >= 0).sum())
        kept.add(levels)
        assert (codes[:, :levels] >= 0).all() and (codes[:, levels:] == -1).all()
        # The output is the reconstruction from the kept levels only.
        assert torch.allclose(q, sum(books[lvl][codes[:, lvl]] for lvl in range(levels)), atol=1e-5)
    assert len(kept) > 1 and kept <= {1, 2, 3, 4}


def test_shared_codebook(gen):
    rvq, _ = train(ResidualVQ(DIM, 64, LEVELS, shared_codebook=True, decay=0.9), gen, steps=20)
    assert rvq.codebooks.shape == (1, 64, DIM) and rvq.ema_embed_sum.shape == (1, 64, DIM)
    x = toy_batch(gen, 256)
    codes = rvq.encode(x)
    by_hand = sum(rvq.codebooks[0][codes[:, lvl]] for lvl in range(LEVELS))
    assert torch.allclose(rvq.decode(codes), by_hand, atol=1e-5)
    errors = [relative_error(rvq.decode(codes[:, :lvl]), x) for lvl in range(1, LEVELS + 1)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_dead_code_is_restarted(gen):
    rvq = ResidualVQ(DIM, K, 1, kmeans_init=False, decay=0.9, dead_code_threshold=1.0)
    with torch.no_grad():
        rvq.codebooks[0, -1] = 1e6  # never the nearest code of anything
    rvq(toy_batch(gen, 256))
    assert rvq.codebooks[0, -1].abs().max() < 100  # now a batch residual


def test_codebook_dim_projections(gen):
    rvq = ResidualVQ(16, K, 2, codebook_dim=4)
    assert rvq.codebooks.shape == (2, K, 4)
    x = torch.randn(3, 10, 16, generator=gen)
    q, codes, loss = rvq(x)
    assert q.shape == x.shape and codes.shape == (3, 10, 2)
    (q.sum() + loss).backward()
    assert rvq.project_in.weight.grad.abs().sum() > 0 and rvq.project_out.weight.grad.abs().sum() > 0
    rvq.eval()
    assert torch.allclose(rvq.decode(rvq.encode(x)), rvq(x)[0], atol=1e-6)


def test_autocast_bf16_on_cpu(gen):
    rvq, _ = train(ResidualVQ(DIM, K, LEVELS, codebook_dim=6, decay=0.9), gen, steps=5)
    x = toy_batch(gen, 200).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, codes, loss = rvq(x)
    # The quantizer ran in fp32 on the bf16 values: the same codes as without autocast.
    assert torch.equal(codes, rvq.encode(x.float()))
    assert q.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert relative_error(q, rvq(x.float())[0]) < 1e-2


@pytest.mark.parametrize("shared,codebook_dim", [(False, None), (True, None), (False, 6)])
def test_vector_quantize_pytorch_codes_match(shared, codebook_dim, gen):
    vqp = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch is not installed")
    theirs = vqp.ResidualVQ(dim=DIM, num_quantizers=LEVELS, codebook_size=K, codebook_dim=codebook_dim,
                            shared_codebook=shared, kmeans_init=True, kmeans_iters=3, decay=0.9)
    theirs.train()
    for _ in range(3):  # their k-means and EMA give trained codebooks to compare on
        theirs(toy_batch(gen, 256)[None])
    theirs.eval()
    ours = ResidualVQ.from_vector_quantize_pytorch(theirs).eval()
    assert ours.shared_codebook == shared and ours.codebook_dim == (codebook_dim or DIM)
    x = toy_batch(gen, 512)[None]
    with torch.no_grad():
        q_theirs, codes_theirs, _ = theirs(x)
    q_ours, codes_ours, _ = ours(x)
    assert torch.equal(codes_ours, codes_theirs)
    assert torch.allclose(q_ours, q_theirs, atol=1e-4)


@pytest.mark.parametrize("kwargs", [{"codebook_size": 0}, {"num_levels": 0}, {"dim": 0}])
def test_sizes_below_one_are_refused_naming_them(kwargs):
    args = {"dim": 8, "codebook_size": 16, "num_levels": 2, **kwargs}
    with pytest.raises(ValueError, match=r"ResidualVQ: .*must be >= 1, got " + ", ".join(str(v) for v in args.values())):
        ResidualVQ(**args)
