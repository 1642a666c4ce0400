"""RQ-VAE pipeline models in their standard configuration (256x256 -> 16x16x4): shapes,
parameter counts, partial decoding, and the generator's sampling loop. Random weights, CPU."""

import pytest
import torch

from tinykern.pipelines.rqvae.generate import quantize_generator
from tinykern.pipelines.rqvae.models import SHIPPED, STANDARD, RQVAE, Refiner, TokenGenerator, count_parameters
from tinykern.nn import Q4Linear


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def test_standard_rqvae_shapes():
    model = RQVAE(STANDARD["tokenizer"]).eval()
    assert model.downsample == 16 and model.grid == 16
    images = torch.rand(1, 3, 256, 256)
    codes = model.encode(images)
    assert codes.shape == (1, 16, 16, 4) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < STANDARD["tokenizer"]["codebook_size"]
    for levels in range(1, 5):
        assert model.decode(codes[..., :levels]).shape == (1, 3, 256, 256)
    recon, fwd_codes, loss = model(images)
    assert recon.shape == images.shape and torch.equal(fwd_codes, codes) and loss.dim() == 0


def test_standard_refiner_size_and_identity_at_init():
    refiner = Refiner(STANDARD["refiner"]).eval()
    params = count_parameters(refiner)
    assert 15e6 <= params <= 25e6, f"standard Refiner has {params:,} parameters, expected 15-25M"
    x = torch.rand(1, 3, 256, 256)
    # Its output conv starts at zero: an untrained refiner passes the RQ-VAE output through.
    assert torch.equal(refiner(x), x)


def test_standard_generator_shapes():
    tok = STANDARD["tokenizer"]
    gen = TokenGenerator(STANDARD["generator"], vocab_size=40, grid=16, codebook_size=tok["codebook_size"],
                         num_levels=tok["num_levels"], code_dim=tok["latent_dim"]).eval()
    ids = torch.randint(1, 40, (2, STANDARD["generator"]["text_length"]))
    codes = gen.generate(ids, torch.zeros_like(ids[:1]), generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, 16, 16, 4) and int(codes.min()) >= 0 and int(codes.max()) < tok["codebook_size"]
    loss = gen.loss(codes.flatten(1, 2), ids)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_cached_decoding_matches_the_causal_full_pass():
    """Greedy codes decoded position by position with the key/value cache are what the masked
    full pass (the training path) predicts from those same codes; and a position's output does
    not depend on later positions."""
    gen = TokenGenerator(SHIPPED["generator"], vocab_size=30, grid=4, codebook_size=16, num_levels=3, code_dim=8).eval()
    ids = torch.randint(1, 30, (3, SHIPPED["generator"]["text_length"]))
    codes = gen.generate(ids, ids[:1], guidance=0, temperature=1e-9).flatten(1, 2)
    with torch.no_grad():
        h = gen.hidden(codes, ids)
        greedy = torch.stack([logits.argmax(-1) for logits in gen.teacher_forced_logits(h, codes)], -1)
        assert torch.equal(greedy, codes)
        changed = codes.clone()
        changed[:, 9:] = (changed[:, 9:] + 1) % 16
        assert torch.allclose(gen.hidden(changed, ids)[:, :10], h[:, :10], atol=1e-5)
        assert not torch.allclose(gen.hidden(changed, ids)[:, 10:], h[:, 10:], atol=1e-3)


def test_shipped_configuration_is_smaller():
    tok = RQVAE(SHIPPED["tokenizer"])
    assert tok.downsample == 8 and tok.grid == 8
    assert count_parameters(Refiner(SHIPPED["refiner"])) < 2e6


def test_generator_linears_quantize_to_q4k():
    gen = TokenGenerator(SHIPPED["generator"], vocab_size=30, grid=8, codebook_size=256, num_levels=4, code_dim=64).eval()
    ids = torch.randint(1, 30, (2, SHIPPED["generator"]["text_length"]))
    report = quantize_generator(gen)
    # Every Linear but the two 64 -> 256 projections of single codebook latents, whose rows are
    # shorter than min_features (128).
    assert {r.name for r in report if r.format != "q4_k"} == {"code_in", "depth_in"}
    assert {n for n, m in gen.named_modules() if type(m) is torch.nn.Linear} == {"code_in", "depth_in"}
    assert any(isinstance(m, Q4Linear) for m in gen.modules())
    codes = gen.generate(ids, torch.zeros_like(ids[:1]), generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, 8, 8, 4)
