"""Transformer building blocks shared by every encoder. Attention goes through
`scaled_dot_product_attention`, which picks a fused kernel (flash / memory-efficient) where one exists,
except for bf16 on the CPU: there PyTorch's flash kernel is several times slower than two matmuls and a
softmax when training (its backward most of all), which run on the AMX/AVX-512 matrix units
(see `attention`)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = (
            self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        )  # (B, h, N, d)
        y = attention(q, k, v, attn_mask, self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class PatchConv(nn.Conv2d):
    """Non-overlapping patches to tokens (kernel == stride, no padding): nn.Conv2d's weights, state-dict
    keys and result, computed as one matmul over the unfolded patches. On the CPU that is about 3x
    faster forward+backward than the convolution kernel (bf16 autocast, 128 images of 64 px, patch 8,
    width 192, one thread: 31 vs 10 ms), the same on CUDA."""

    def __init__(self, in_channels: int, out_channels: int, patch: int | tuple[int, int], bias: bool = True):
        super().__init__(in_channels, out_channels, patch, patch, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D, H // ph, W // pw), as the convolution (trailing rows and columns that
        fill no patch are dropped)."""
        (ph, pw), (B, C, H, W) = self.kernel_size, x.shape
        gh, gw = H // ph, W // pw
        x = x[..., : gh * ph, : gw * pw].reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
        y = F.linear(x.reshape(B, gh, gw, C * ph * pw), self.weight.reshape(self.out_channels, -1), self.bias)
        return y.permute(0, 3, 1, 2)  # a view: flatten(2).transpose(1, 2) gives back (B, P, D) for free


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU, x * sigmoid(1.702 x): its checkpoints need it."""
    return x * torch.sigmoid(1.702 * x)


# The MLP activations a tower may name: exact GELU (the default), OpenAI CLIP's QuickGELU, and the
# tanh approximation (SigLIP's `gelu_pytorch_tanh`).
Activation = Literal["gelu", "quick_gelu", "gelu_tanh"]  # a Config field naming one of ACTIVATIONS
ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for (B, h, N, d) inputs; `mask` is boolean (True = may attend).

    bf16 on the CPU takes the explicit form: at the sizes trained here (B=128, h=3, N=65, d=64, one
    thread) forward+backward is 124 ms against 641 ms for the flash kernel and 331 ms for SDPA's math
    path. It keeps the (B, h, N, N) scores for the backward, which is what makes it fast, and why the
    fused kernels stay for fp32, for CUDA, and for inference (where the flash forward is the faster)."""
    backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or not backward:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    # The scores stay bf16: the softmax kernel accumulates in fp32 and rounds its output to bf16,
    # which is what a float softmax cast back would give, without two (B, h, N, N) copies each way.
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:  # finite, not -inf: a row with no key to attend to gives 0, as SDPA does
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(-1)
    if mask is not None:
        weights = weights * mask.any(-1, keepdim=True)
    if dropout:
        weights = F.dropout(weights, dropout)
    return weights @ v


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        act: str = "gelu",
        eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        act: str = "gelu",
        eps: float = 1e-5,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout, act, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)
        return self.norm(x)


def padding_attn_mask(valid: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """(B, N) bool valid-token mask -> (B, 1, N, N) bool mask for SDPA (True = may attend)."""
    mask = valid[:, None, None, :]  # keys
    if causal:
        n = valid.shape[1]
        mask = mask & torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
    return mask


def init_weights(module: nn.Module) -> None:
    """Truncated-normal linear weights, zero biases (ViT / CLIP practice)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_scaled(transformer: Transformer) -> None:
    """CLIP's width-scaled initialisation of a transformer's blocks (Radford et al. 2021): attention
    input std width**-0.5, MLP input (2 width)**-0.5, and the two projections back into the residual
    stream width**-0.5 (2 depth)**-0.5, so the residual grows the same at any depth. Biases zero.

    Why not `init_weights`' fixed 0.02: at width 192 that is 2-3.6x smaller than these, and in
    benchmarks/vs_openclip.py (scenes, ViT 4x192/8 + text 4x192, 128 steps) the scaled init brought
    the final loss from 2.61 to 0.91 and position zero-shot from 0.27 to 1.00."""
    init_weights(transformer)
    width, depth = transformer.norm.normalized_shape[0], len(transformer.blocks)
    residual_std = width**-0.5 * (2 * depth) ** -0.5
    for block in transformer.blocks:
        nn.init.normal_(block.attn.qkv.weight, std=width**-0.5)
        nn.init.normal_(block.attn.proj.weight, std=residual_std)
        nn.init.normal_(block.mlp.fc1.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(block.mlp.fc2.weight, std=residual_std)


def sincos_grid(rows: int, cols: int, dim: int) -> torch.Tensor:
    """(rows, cols, dim) fixed 2-D sine-cosine position codes: half the channels per axis (MAE's
    initialisation; ViT patches use a square grid, spectrogram patches a rectangular one)."""
    if dim % 4:
        raise ValueError(f"width {dim} must be divisible by 4 for 2-D sin-cos position codes")
    ys, xs = torch.meshgrid(
        torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32), indexing="ij"
    )
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out = [f(axis[..., None] * freqs) for axis in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=-1)
