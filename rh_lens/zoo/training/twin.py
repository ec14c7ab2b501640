"""A plain-PyTorch training twin of the zoo's HookedTransformers.

Its parameters *are* the TransformerLens state dict (same names, same shapes: ``embed.W_E``,
``blocks.0.attn.W_Q``, ``blocks.0.attn._W_K`` for grouped-query attention, ...), and its forward
reproduces ``HookedTransformer.forward`` for the two zoo families, but computes attention with
``scaled_dot_product_attention`` (about 3x faster to train on CPU than the hooked model).

- Llama family: RMSNorm, rotary (TL's default half-rotation pairing), SwiGLU (``act_fn="silu"``,
  ``gated_mlp=True``), grouped-query attention, no biases (kept at zero, not trained).
- GPT-2 family: LayerNorm, learned absolute positions (initialised sinusoidally), exact GELU
  (``act_fn="gelu"``), MHA.

A test checks the twin's logits against ``HookedTransformer`` on the same weights.
"""

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformerConfig


def _param(*shape: int, std: float | None = None, fill: float = 0.0,
           train: bool = True) -> nn.Parameter:
    t = torch.empty(*shape)
    if std is None:
        t.fill_(fill)
    else:
        nn.init.normal_(t, std=std)
    return nn.Parameter(t, requires_grad=train)


def _check(cfg: HookedTransformerConfig) -> str:
    if cfg.positional_embedding_type == "rotary":
        ok = (cfg.normalization_type == "RMS" and cfg.gated_mlp and cfg.act_fn == "silu"
              and not cfg.rotary_adjacent_pairs and cfg.rotary_dim == cfg.d_head)
        family = "llama"
    else:
        ok = (cfg.positional_embedding_type == "standard" and cfg.normalization_type == "LN"
              and not cfg.gated_mlp and cfg.act_fn == "gelu")
        family = "gpt2"
    if not ok or cfg.attn_only or cfg.final_rms != (family == "llama"):
        raise ValueError(f"the twin supports only the zoo's llama and gpt2 shapes, got {cfg}")
    return family


def _sinusoids(n: int, d: int) -> Tensor:
    """Sinusoidal position table (Vaswani et al.), RMS 1/sqrt(2): the GPT-2 family's learned
    positions start from it, so that offsets are linear maps of positions from the first step
    (previous-token and induction heads formed only slowly from random positions)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10_000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class _Holder(nn.Module):
    """A module whose only job is to give its parameters TransformerLens's dotted names."""


class Twin(nn.Module):
    """Trainable twin; ``state_dict()`` loads into ``HookedTransformer(cfg)`` unchanged."""

    def __init__(self, cfg: HookedTransformerConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.family = _check(cfg)
        llama = self.family == "llama"
        d, h, dh, kv = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_key_value_heads or cfg.n_heads
        std, out_std = 0.02, 0.02 / math.sqrt(2 * cfg.n_layers)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.embed = _Holder()
        self.embed.W_E = _param(cfg.d_vocab, d, std=std)
        if not llama:
            self.pos_embed = _Holder()
            self.pos_embed.W_pos = nn.Parameter(_sinusoids(cfg.n_ctx, d) * std / math.sqrt(0.5))
        self.blocks = nn.ModuleList()
        for _ in range(cfg.n_layers):
            block = _Holder()
            for ln in ("ln1", "ln2"):
                setattr(block, ln, _Holder())
                getattr(block, ln).w = _param(d, fill=1.0)
                if not llama:
                    getattr(block, ln).b = _param(d)
            attn = block.attn = _Holder()
            g = "_" if llama and kv != h else ""
            attn.W_Q = _param(h, d, dh, std=std)
            attn.W_O = _param(h, dh, d, std=out_std)
            attn.b_Q = _param(h, dh, train=not llama)
            attn.b_O = _param(d, train=not llama)
            setattr(attn, f"{g}W_K", _param(kv, d, dh, std=std))
            setattr(attn, f"{g}W_V", _param(kv, d, dh, std=std))
            setattr(attn, f"{g}b_K", _param(kv, dh, train=not llama))
            setattr(attn, f"{g}b_V", _param(kv, dh, train=not llama))
            mlp = block.mlp = _Holder()
            mlp.W_in = _param(d, cfg.d_mlp, std=std)
            if llama:
                mlp.W_gate = _param(d, cfg.d_mlp, std=std)
            mlp.W_out = _param(cfg.d_mlp, d, std=out_std)
            mlp.b_in = _param(cfg.d_mlp, train=not llama)
            mlp.b_out = _param(d, train=not llama)
            self.blocks.append(block)
        self.ln_final = _Holder()
        self.ln_final.w = _param(d, fill=1.0)
        if not llama:
            self.ln_final.b = _param(d)
        self.unembed = _Holder()
        self.unembed.W_U = _param(d, cfg.d_vocab, std=std)
        self.unembed.b_U = _param(cfg.d_vocab, train=not llama)
        torch.random.set_rng_state(gen_state)
        self._rotary: tuple[int, Tensor, Tensor] | None = None

    def _norm(self, x: Tensor, ln: nn.Module) -> Tensor:
        if self.family == "llama":
            scale = (x.pow(2).mean(-1, keepdim=True) + self.cfg.eps).sqrt()
            return x / scale * ln.w
        return F.layer_norm(x, (x.shape[-1],), ln.w, ln.b, self.cfg.eps)

    def _sin_cos(self, n: int, device) -> tuple[Tensor, Tensor]:
        """TL's tables: angle = pos / base ** (i / (dim/2)), each frequency repeated (2 d)."""
        if self._rotary is None or self._rotary[0] < n:
            half = self.cfg.rotary_dim // 2
            freq = self.cfg.rotary_base ** (torch.arange(half, dtype=torch.float32) / half)
            freq = torch.cat([freq, freq])
            angles = torch.arange(n, dtype=torch.float32)[:, None] / freq[None, :]
            self._rotary = (n, torch.sin(angles), torch.cos(angles))
        _, sin, cos = self._rotary
        return sin[:n].to(device), cos[:n].to(device)

    @staticmethod
    def _rotate(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
        n = x.shape[-1] // 2
        flipped = torch.cat([-x[..., n:], x[..., :n]], dim=-1)
        return x * cos + flipped * sin

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        return self.unembed_resid(self.resid_final(tokens))

    def resid_final(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        cfg = self.cfg
        n = tokens.shape[1]
        if n > cfg.n_ctx and self.family == "gpt2":
            raise ValueError(f"{n} tokens exceed the learned positions (n_ctx={cfg.n_ctx})")
        x = self.embed.W_E[tokens]
        if self.family == "gpt2":
            x = x + self.pos_embed.W_pos[:n]
            sin = cos = None
        else:
            sin, cos = self._sin_cos(n, x.device)
            sin, cos = sin[None, :, None], cos[None, :, None]
        bias = self._bias
        for block in self.blocks:
            a = block.attn
            hx = self._norm(x, block.ln1)
            g = "_" if hasattr(a, "_W_K") else ""
            q, k, v = (bias(torch.einsum("bpd,hde->bphe", hx, getattr(a, f"{pre}W_{c}")),
                            getattr(a, f"{pre}b_{c}"))
                       for pre, c in (("", "Q"), (g, "K"), (g, "V")))
            if sin is not None:
                q, k = self._rotate(q, sin, cos), self._rotate(k, sin, cos)
            rep = cfg.n_heads // k.shape[2]
            if rep > 1:
                k = k.repeat_interleave(rep, dim=2)
                v = v.repeat_interleave(rep, dim=2)
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            z = z.transpose(1, 2).reshape(x.shape[0], n, cfg.n_heads * cfg.d_head)
            x = bias(x + z @ a.W_O.reshape(cfg.n_heads * cfg.d_head, cfg.d_model), a.b_O)
            hx = self._norm(x, block.ln2)
            m = block.mlp
            if self.family == "llama":
                mid = bias(F.silu(hx @ m.W_gate) * (hx @ m.W_in), m.b_in)
            else:
                mid = F.gelu(hx @ m.W_in + m.b_in)
            x = bias(x + mid @ m.W_out, m.b_out)
        return self._norm(x, self.ln_final)

    def unembed_resid(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        return self._bias(resid @ self.unembed.W_U, self.unembed.b_U)

    def _bias(self, x: Tensor, b: Tensor) -> Tensor:
        """``x + b``, except for the llama family's biases: frozen at zero, so adding them would
        change no bit of ``x`` (nor of any gradient) and only cost time, most of all ``b_U``'s over
        every logit."""
        return x if self.family == "llama" else x + b

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self.family == "llama":
            nonzero = [k for k, p in self.named_parameters()
                       if k.rsplit(".", 1)[-1].startswith(("b_", "_b_")) and p.any()]
            if nonzero:
                raise ValueError(f"the llama twin keeps its biases at zero; nonzero: {nonzero[:4]}")
        return out

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(k, p) for k, p in self.named_parameters() if p.requires_grad]
