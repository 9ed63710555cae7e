"""The decoder in numpy float32: embedding -> layers of (RMSNorm, GQA attention with RoPE over the paged KV cache,
RMSNorm, SwiGLU MLP) -> RMSNorm -> LM head, as HF transformers computes Llama, Mistral, Qwen2 (q/k/v bias) and
Qwen3 (per-head q/k RMSNorm).

The KV cache is paged: per layer K and V arrays [num_blocks, block_size, kv_heads, head_dim]; a sequence's token at
position p lives in slot block_table[p // block_size] * block_size + p % block_size. A forward takes a flat batch
of sequence chunks: each chunk's K and V are written to its slots, and its queries attend to the positions before
it (read from the cache through its block table) and to the chunk itself, causally.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import Config
from .weights import Weights


@dataclass
class Chunk:
    """Tokens ``ids`` at positions start..start+len-1 of a sequence whose earlier positions are in the cache.
    ``block_table`` None: no cache at all (start must be 0; nothing is written)."""

    ids: np.ndarray
    start: int
    block_table: np.ndarray | None


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Neox RoPE (rotate_half) of x [T, heads, head_dim] with cos, sin [T, 1, head_dim]."""
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class Layer:
    def __init__(self, cfg: Config, w: Weights, i: int):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        self.input_norm = w.get(p + "input_layernorm.weight")
        self.post_norm = w.get(p + "post_attention_layernorm.weight")
        self.qkv = np.concatenate([w.get(a + f"{n}_proj.weight") for n in "qkv"])
        self.qkv_bias = np.concatenate([w.get(a + f"{n}_proj.bias") for n in "qkv"]) if cfg.qkv_bias else None
        self.o = w.get(a + "o_proj.weight")
        self.o_bias = w.get(a + "o_proj.bias") if cfg.o_bias else None
        self.q_norm = w.get(a + "q_norm.weight") if cfg.qk_norm else None
        self.k_norm = w.get(a + "k_norm.weight") if cfg.qk_norm else None
        m = p + "mlp."
        self.gate_up = np.concatenate([w.get(m + "gate_proj.weight"), w.get(m + "up_proj.weight")])
        self.down = w.get(m + "down_proj.weight")
        self.gate_up_bias = (np.concatenate([w.get(m + "gate_proj.bias"), w.get(m + "up_proj.bias")])
                             if cfg.mlp_bias else None)
        self.down_bias = w.get(m + "down_proj.bias") if cfg.mlp_bias else None

    def nbytes(self) -> int:
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))


def _linear(x, weight, bias=None):
    y = x @ weight.T
    return y if bias is None else y + bias


class Decoder:
    def __init__(self, cfg: Config, model_dir):
        w = Weights(model_dir)
        self.cfg = cfg
        self.embed = w.get("model.embed_tokens.weight")
        self.lm_head = self.embed if cfg.tie_word_embeddings and "lm_head.weight" not in w else w.get("lm_head.weight")
        self.norm = w.get("model.norm.weight")
        self.layers = [Layer(cfg, w, i) for i in range(cfg.num_layers)]
        self.inv_freq = np.asarray(cfg.inv_freq, np.float32)
        self.k_cache: list[np.ndarray] = []
        self.v_cache: list[np.ndarray] = []
        self.block_size = 0

    def weight_bytes(self) -> int:
        head = 0 if self.lm_head is self.embed else self.lm_head.nbytes
        return self.embed.nbytes + head + self.norm.nbytes + sum(layer.nbytes() for layer in self.layers)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        c = self.cfg
        shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
        self.k_cache = [np.zeros(shape, np.float32) for _ in range(c.num_layers)]
        self.v_cache = [np.zeros(shape, np.float32) for _ in range(c.num_layers)]
        self.block_size = block_size

    def _slots(self, table: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return table[positions // self.block_size].astype(np.int64) * self.block_size + positions % self.block_size

    def forward(self, chunks: list[Chunk], logits_rows: np.ndarray) -> np.ndarray:
        """Runs the chunks as one flat batch; returns the logits [len(logits_rows), vocab] of those rows of it."""
        c = self.cfg
        ids = np.concatenate([ch.ids for ch in chunks]).astype(np.int64)
        positions = np.concatenate([np.arange(ch.start, ch.start + len(ch.ids)) for ch in chunks])
        bounds = np.cumsum([0] + [len(ch.ids) for ch in chunks])
        freqs = positions.astype(np.float32)[:, None] * self.inv_freq[None, :]
        freqs = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
        cos, sin = np.cos(freqs), np.sin(freqs)
        slots = [None if ch.block_table is None else self._slots(ch.block_table, np.arange(ch.start + len(ch.ids)))
                 for ch in chunks]
        nq, nkv, hd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.head_dim
        x = self.embed[ids]
        for li, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, c.rms_norm_eps)
            qkv = _linear(h, layer.qkv, layer.qkv_bias)
            q = qkv[:, :nq].reshape(-1, c.num_heads, hd)
            k = qkv[:, nq:nq + nkv].reshape(-1, c.num_kv_heads, hd)
            v = qkv[:, nq + nkv:].reshape(-1, c.num_kv_heads, hd)
            if layer.q_norm is not None:
                q = rms_norm(q, layer.q_norm, c.rms_norm_eps)
                k = rms_norm(k, layer.k_norm, c.rms_norm_eps)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            out = np.empty((len(ids), nq), np.float32)
            for i, ch in enumerate(chunks):
                lo, hi = bounds[i], bounds[i + 1]
                out[lo:hi] = self._attend(li, ch, slots[i], q[lo:hi], k[lo:hi], v[lo:hi])
            x = x + _linear(out, layer.o, layer.o_bias)
            h = rms_norm(x, layer.post_norm, c.rms_norm_eps)
            gu = _linear(h, layer.gate_up, layer.gate_up_bias)
            inter = gu.shape[-1] // 2
            x = x + _linear(silu(gu[:, :inter]) * gu[:, inter:], layer.down, layer.down_bias)
        rows = rms_norm(x[np.asarray(logits_rows, np.int64)], self.norm, c.rms_norm_eps)
        return rows @ self.lm_head.T

    def _attend(self, li: int, ch: Chunk, slots, q, k, v) -> np.ndarray:
        """One chunk's attention output [t, heads * head_dim]: its K/V written to the cache, its queries over the
        cached positions before it and the chunk itself."""
        c = self.cfg
        t, start = len(ch.ids), ch.start
        if slots is not None:
            kc = self.k_cache[li].reshape(-1, c.num_kv_heads, c.head_dim)
            vc = self.v_cache[li].reshape(-1, c.num_kv_heads, c.head_dim)
            kc[slots[start:]] = k
            vc[slots[start:]] = v
            k = np.concatenate([kc[slots[:start]], k])
            v = np.concatenate([vc[slots[:start]], v])
        g = c.num_heads // c.num_kv_heads
        qh = q.reshape(t, c.num_kv_heads, g, c.head_dim).transpose(1, 2, 0, 3)     # [kv, g, t, hd]
        kh, vh = k.transpose(1, 0, 2), v.transpose(1, 0, 2)                       # [kv, S, hd]
        scores = (qh @ kh[:, None].swapaxes(-1, -2)) * np.float32(c.head_dim ** -0.5)   # [kv, g, t, S]
        qpos = np.arange(start, start + t)[:, None]
        kpos = np.arange(start + t)[None, :]
        allowed = kpos <= qpos
        if c.sliding_window:
            allowed &= kpos > qpos - c.sliding_window
        scores = np.where(allowed, scores, np.float32(-np.inf))
        out = softmax(scores) @ vh[:, None]                                       # [kv, g, t, hd]
        return out.transpose(2, 0, 1, 3).reshape(t, -1)
