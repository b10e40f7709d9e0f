"""Networks: attention implementations agree, embeddings, EMA, UNet shapes, tokenizer."""

import logging
import math

import pytest
import torch

from genlab.data.tokenizer import BPETokenizer
from genlab.nn.attention import attention
from genlab.nn.ema import EMA
from genlab.nn.embeddings import sinusoidal_embedding
from genlab.nn.text_encoder import TransformerTextEncoder
from genlab.nn.unet import UNet
from genlab.utils.lr_schedule import warmup_cosine


def test_sdpa_and_math_attention_agree_with_a_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    a = attention(q, k, v, mask, impl="sdpa")
    b = attention(q, k, v, mask, impl="math")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # masked keys are ignored: changing them changes nothing
    v2 = v.clone()
    v2[1, :, 2:] = 100.0
    torch.testing.assert_close(attention(q, k, v2, mask, impl="math")[1], b[1])


def test_sinusoidal_embedding_values():
    emb = sinusoidal_embedding(torch.tensor([0.0, 1.0]), 4)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    # frequencies 1 and 1/100 for dim 4: exp(-ln(1e4) * [0, 1] / 2)
    expected = torch.tensor([1.0, 0.01]).cos().tolist() + torch.tensor([1.0, 0.01]).sin().tolist()
    torch.testing.assert_close(emb[1], torch.tensor(expected))


def test_ema_warmup_and_update():
    net = torch.nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(0.0)
    ema = EMA(net, decay=0.999)
    net.weight.data.fill_(1.0)
    ema.update(net)  # decay min(0.999, 1/10) = 0.1: 0.1·0 + 0.9·1
    assert ema.module.weight.item() == pytest.approx(0.9)
    assert ema.current_decay() == pytest.approx(2 / 11)
    assert not ema.module.weight.requires_grad
    for _ in range(100_000 - 1):
        ema.num_updates += 1
    assert ema.current_decay() == pytest.approx(0.999)


def test_unet_output_shape_and_zero_init():
    net = UNet(context_dim=16, cond_dim=16, channels=(16, 32), attention_levels=(1,), heads=2)
    x = torch.randn(2, 3, 16, 16)
    ctx, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    out = net(x, torch.tensor([3, 900]), context=ctx, context_mask=mask, cond=torch.randn(2, 16))
    assert out.shape == x.shape
    assert torch.all(out == 0)  # zero-initialised head: the untrained net predicts ε̂ = 0


def test_unet_rejects_bad_config():
    with pytest.raises(ValueError, match="groups"):
        UNet(channels=(30, 60), groups=8)
    with pytest.raises(ValueError, match="attention_levels"):
        UNet(channels=(16, 32), attention_levels=(3,))


def test_unet_cross_attention_only_levels_read_the_text():
    """cross_attention_levels: cross-attention on the tokens without self-attention; the
    caption reaches the output through that level alone when it is the only attention."""
    net = UNet(
        context_dim=16,
        channels=(16, 32),
        attention_levels=(),
        cross_attention_levels=(0,),
        mid_attention=False,
        heads=2,
    )
    block = net.down[0][0].attn
    assert block.self_attn is None and block.cross_attn is not None
    for p in net.parameters():  # leave the zero init: let every path carry signal
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 5])
    mask = torch.ones(2, 4, dtype=torch.bool)
    ctx = torch.randn(1, 4, 16).expand(2, 4, 16)
    a = net(x, t, context=ctx, context_mask=mask)
    b = net(x, t, context=ctx + 1, context_mask=mask)
    assert a.shape == x.shape and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="list it once"):
        UNet(context_dim=16, channels=(16, 32), attention_levels=(1,), cross_attention_levels=(1,))
    with pytest.raises(ValueError, match="need a context"):
        UNet(channels=(16, 32), attention_levels=(), cross_attention_levels=(0,))
    with pytest.raises(ValueError, match="attention_levels"):
        UNet(context_dim=16, channels=(16, 32), attention_levels=(), cross_attention_levels=(2,))


def test_text_encoder_ignores_padding():
    enc = TransformerTextEncoder(vocab_size=20, context_length=6, width=16, layers=1, heads=2)
    ids = torch.tensor([[2, 5, 6, 3, 0, 0], [2, 5, 6, 3, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    tokens, pooled = enc(ids, mask)
    assert tokens.shape == (2, 6, 16) and pooled.shape == (2, 16)
    torch.testing.assert_close(pooled[0], pooled[1])  # padded positions do not matter


def test_tokenizer_round_trip_and_truncation(caplog):
    tok = BPETokenizer.train(["a large red circle at the top left"] * 20, vocab_size=64)
    ids, mask = tok.encode(["a red circle", ""], context_length=8)
    assert ids[0, 0] == tok.bos_id and ids[1].tolist()[:2] == [tok.bos_id, tok.eos_id]
    assert tok.decode(ids[0].tolist()) == "a red circle"
    assert mask.sum(1).tolist() == [int((ids[0] != tok.pad_id).sum()), 2]
    again = BPETokenizer.from_json(tok.to_json())
    torch.testing.assert_close(again.encode(["a red circle"], context_length=8)[0], ids[:1])
    with caplog.at_level(logging.WARNING):
        long_ids, _ = tok.encode(["a large red circle at the top left " * 3], context_length=8)
    assert long_ids[0, -1] == tok.eos_id and "truncated" in caplog.text
    with pytest.raises(ValueError, match="no captions"):
        BPETokenizer.train([], vocab_size=64)


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=110, warmup_steps=10)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5)
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(0.99 * math.pi)))


def test_gradient_checkpointing_gives_the_plain_gradients() -> None:
    """gradient_checkpointing=true (genlab/nn/checkpointing.py) changes memory, not results:
    the same outputs and parameter gradients for the UNet (dropout on: the recomputation
    replays its masks), the DALL-E and prior Transformers and the text encoder; the text
    encoder's per-layer loop equals nn.TransformerEncoder's own forward."""
    import copy

    from genlab.nn.text_encoder import TransformerTextEncoder
    from genlab.nn.transformer import DalleTransformer
    from genlab.nn.unclip import PriorTransformer
    from genlab.nn.unet import UNet

    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    cases = [
        (
            UNet(
                channels=[8, 16],
                attention_levels=[1],
                heads=2,
                groups=4,
                context_dim=8,
                dropout=0.2,
            ),
            lambda net: net(
                torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), context=torch.randn(2, 5, 8)
            ),
        ),
        (
            DalleTransformer(
                vocab_size=60, text_length=4, grid=2, width=16, layers=2, heads=2, dropout=0.1
            ),
            lambda net: net(ids),
        ),
        (
            PriorTransformer(
                embed_dim=8, text_width=8, context_length=8, width=16, layers=2, heads=2
            ),
            lambda net: net(
                torch.randn(2, 8),
                torch.tensor([1, 9]),
                text_tokens=torch.randn(2, 8, 8),
                text_mask=mask,
                text_embed=torch.randn(2, 8),
            ),
        ),
        (
            TransformerTextEncoder(vocab_size=50, context_length=8, width=16, layers=2, heads=2),
            lambda net: net(ids, mask)[0],
        ),
    ]
    for plain, run in cases:
        checkpointed = copy.deepcopy(plain)
        checkpointed.gradient_checkpointing = True
        results = []
        for net in (plain, checkpointed):
            torch.manual_seed(1)  # the same inputs and dropout masks for both
            out = run(net)
            out.float().square().mean().backward()
            results.append(
                (out.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None])
            )
        (out_a, grads_a), (out_b, grads_b) = results
        torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
        assert len(grads_a) == len(grads_b) > 0
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    encoder = cases[-1][0].eval()
    x = encoder.token_embed(ids) + encoder.pos_embed[:8]
    with torch.no_grad():
        torch.testing.assert_close(
            encoder(ids, mask)[0], encoder.norm(encoder.encoder(x, src_key_padding_mask=~mask))
        )
