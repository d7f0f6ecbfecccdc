"""nanoGPT's model and AdamW recipe in PyTorch, for benchmarks.bench_train to run alongside (never imported by tinylm).

Written for the benchmark from the model's definition (docs/architecture.md, tinylm/core/gpt2.py): pre-norm blocks without biases,
causal scaled-dot-product attention, GELU (tanh form, as tinylm), tied token embedding and head,
GPT-2's init (N(0, 0.02), residual projections 0.02/√(2L)); torch.optim.AdamW with nanoGPT's
parameter groups (decay on 2-D tensors) and clip_grad_norm_. Needs `pip install torch` (the CPU wheel).
"""
import math
import time

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, C, H):
        super().__init__()
        self.H = H
        self.ln_1, self.ln_2 = nn.LayerNorm(C, bias=False), nn.LayerNorm(C, bias=False)
        self.c_attn, self.attn_proj = nn.Linear(C, 3 * C, bias=False), nn.Linear(C, C, bias=False)
        self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C, bias=False), nn.Linear(4 * C, C, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        heads = lambda t: t.view(B, T, self.H, C // self.H).transpose(1, 2)        # (B, H, T, d)
        a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x = x + self.attn_proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


class TorchRun:
    """The same protocol as bench_train.TinyRun: step(lr) trains one step, loss(x, y) evaluates."""

    def __init__(self, config, seed, weight_decay=0.1, betas=(0.9, 0.99), grad_clip=1.0, threads=2):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        self.model = GPT(config.vocab_size, config.block_size, config.n_layer, config.n_head, config.n_embd)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        rest = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=1e-3, betas=betas)
        self.grad_clip = grad_clip
        self.opt_s = 0.0          # seconds in clipping and the optimizer step

    def step(self, x, y, lr):
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss = self.model(torch.from_numpy(x), torch.from_numpy(y))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.opt_s += time.perf_counter() - t
        return float(loss.detach())

    @torch.no_grad()
    def loss(self, x, y):
        return float(self.model(torch.from_numpy(x), torch.from_numpy(y)))
