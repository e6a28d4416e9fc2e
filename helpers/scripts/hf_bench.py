"""Transformers' OLMoE timed the way the project's benchmarks time the notebook's model: a full
training step (forward with the router logits, loss, backward, AdamW) and one MoE block's forward +
backward. Shared by `bash setup.sh bench` (bench_moe.py) and the GPU check (gpu_check.py), which
carries this file to a GPU machine.

A shape `p` is (hidden D, layers L, heads, experts E, top-k K, expert intermediate I[, vocab V]);
the vocabulary is OLMoE's 50304 unless given.
"""
import statistics
import time

import torch


def hf_config(p, impl: str):
    from transformers import OlmoeConfig
    d, l, h, e, k, i = p[:6]
    cfg = OlmoeConfig(vocab_size=vocab(p), hidden_size=d, intermediate_size=i, num_hidden_layers=l, num_attention_heads=h,
                      num_key_value_heads=h, num_experts=e, num_experts_per_tok=k, max_position_embeddings=4096,
                      norm_topk_prob=False, router_aux_loss_coef=0.01, output_router_logits=True, pad_token_id=1,
                      eos_token_id=50279, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = impl
    return cfg


def vocab(p) -> int:
    return p[6] if len(p) > 6 else 50304


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_train_step(p, impl, b, t, steps, device, dtype, master_fp32=True, warmup=1) -> float:
    """Median seconds of `steps` training steps after `warmup` untimed ones. With `master_fp32` the weights and
    AdamW state are fp32 and the forward runs under autocast in `dtype` (bf16-mixed); without, the
    model and its optimizer state are `dtype` throughout (pure bf16: half the memory)."""
    from transformers import OlmoeForCausalLM
    torch.manual_seed(0)
    with device:  # initialised where it trains: a 7B model initialised on the CPU takes minutes
        model = OlmoeForCausalLM(hf_config(p, impl))
    if not master_fp32:
        model = model.to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    x = torch.randint(2, min(50000, vocab(p)), (b, t + 1), device=device)
    times = []
    for s in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=x[:, :-1], labels=x[:, 1:].contiguous(), output_router_logits=True)
        out.loss.backward()
        opt.step()
        sync(device)
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_moe_layer(p, impl, n, steps, device, dtype, warmup=1) -> float:
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    torch.manual_seed(0)
    block = OlmoeSparseMoeBlock(hf_config(p, impl)).to(device=device, dtype=dtype)
    x = torch.randn(1, n, p[0], device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(1, n, p[0], device=device, dtype=dtype)
    times = []
    for s in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        (block(x) * g).float().sum().backward()
        sync(device)
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
