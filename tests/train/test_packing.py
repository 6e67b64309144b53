"""Padding-free packing helpers (CPU) and the flash-attention 2 packed forward (CUDA only)."""

from __future__ import annotations

import pytest
import torch

from aepo.train.engine import pack, unpack


def test_pack_unpack_round_trip():
    keep = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    x = torch.arange(12.0).view(3, 4)
    packed = pack(x, keep)
    assert packed.shape == (1, 9) and packed[0].tolist() == [0, 1, 2, 4, 5, 8, 9, 10, 11]
    back = unpack(packed, keep)
    assert torch.equal(back, torch.where(keep, x, 0.0))
    logits = torch.randn(3, 4, 7)
    assert torch.equal(pack(logits, keep)[0], logits[keep])
    assert pack(x, None) is x and unpack(x, None) is x


@pytest.mark.cuda
def test_flash_attention_packed_logits_equal_padded(cuda):
    pytest.importorskip("flash_attn")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(cuda, torch.bfloat16).eval()
    ids = torch.randint(0, 64, (3, 9), device=cuda)
    keep = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 7 + [0] * 2], device=cuda).bool()
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        padded = model(input_ids=ids, attention_mask=keep.long()).logits
        model.config._attn_implementation = "flash_attention_2"
        pos = (keep.cumsum(-1) - 1)[keep][None]
        packed = model(input_ids=ids[keep][None], position_ids=pos).logits
    torch.testing.assert_close(packed[0].float(), padded[keep].float(), rtol=2e-2, atol=2e-2)
