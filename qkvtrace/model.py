"""The whole encoder-decoder Transformer ("Attention Is All You Need", as in the PyTorch seq2seq tutorial), with hooks.

Token embeddings scaled by sqrt(d_model) plus learned positional embeddings; post-norm residual sublayers; ReLU
feed-forward with dropout after the ReLU (as the tutorial's position-wise feed-forward layer); dropout. One `MultiHeadAttention` class serves encoder self-, decoder self- and cross-attention.

Every attention module has identity `HookPoint`s (`hook_q`, `hook_k`, `hook_v`, `hook_pattern`, `hook_z`,
`hook_attn_out`) and every layer a `hook_out`; a hook's name is its module path, e.g.
`decoder.layers.0.cross_attn.hook_k`. Training must not pay for capture, so attention has two paths:
- fast: in training mode with no hook attached, fused projections, then `CpuAttention` on CPU with dropout,
  else `scaled_dot_product_attention`;
- explicit: otherwise (evaluation, capture), softmax(QKᵀ/√d_head + mask)·V written out so every hook sees it.
In evaluation both extraction and translation take the explicit path, so capturing changes no output bit.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from qkvtrace.config import ModelConfig
from qkvtrace.vocab import EOS_ID, PAD_ID, SOS_ID


class HookPoint(nn.Module):
    """Identity module that names a place in the forward pass; capture registers forward hooks on it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class MultiHeadAttention(nn.Module):
    """Multi-head attention for self- and cross-attention: queries from `x`, keys and values from `source`."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.hook_q = HookPoint()         # (batch, query_pos, head, d_head)
        self.hook_k = HookPoint()         # (batch, key_pos, head, d_head)
        self.hook_v = HookPoint()         # (batch, key_pos, head, d_head)
        self.hook_pattern = HookPoint()   # (batch, head, query_pos, key_pos), rows sum to 1
        self.hook_z = HookPoint()         # (batch, query_pos, head, d_head), pattern @ v before out_proj
        self.hook_attn_out = HookPoint()  # (batch, query_pos, d_model), after out_proj
        self._hooks = (self.hook_q, self.hook_k, self.hook_v, self.hook_pattern, self.hook_z, self.hook_attn_out)

    def hooked(self) -> bool:
        return any(h._forward_hooks or h._forward_pre_hooks for h in self._hooks)

    def forward(self, x: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        """x (batch, query_pos, d_model), source (batch, key_pos, d_model) -> (batch, query_pos, d_model).

        mask: bool, broadcastable to (batch, head, query_pos, key_pos), True = may attend; None = all may.
        causal: also forbid attending to later key positions (decoder self-attention).
        """
        if self.training and not self.hooked():
            return self._fast(x, source, mask, causal)
        return self._explicit(x, source, mask, causal)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_heads, self.d_head)  # (batch, pos, head, d_head)

    def _fast(self, x, source, mask, causal):
        B, Tq, C = x.shape
        if source is x:
            # One matmul for q, k and v: the three weights side by side, (3*d_model, d_model).
            w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            b = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
            q, k, v = F.linear(x, w, b).split(C, dim=-1)
        else:
            q = self.q_proj(x)
            w = torch.cat([self.k_proj.weight, self.v_proj.weight])
            b = torch.cat([self.k_proj.bias, self.v_proj.bias])
            k, v = F.linear(source, w, b).split(C, dim=-1)
        if causal and mask is not None:
            raise ValueError("causal attention takes no extra mask (right padding never reaches real queries)")
        if x.device.type == "cpu" and self.dropout > 0:
            return self.out_proj(CpuAttention.apply(q, k, v, mask, causal, self.dropout, self.n_heads))
        # (batch, pos, head, d_head) -> (batch, head, pos, d_head) for SDPA
        q, k, v = (self._split(t).transpose(1, 2) for t in (q, k, v))
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=causal and mask is None)
        return self.out_proj(z.transpose(1, 2).reshape(B, Tq, C))  # (batch, query_pos, d_model)

    def _explicit(self, x, source, mask, causal):
        B, Tq, C = x.shape
        Tk = source.shape[1]
        q = self.hook_q(self._split(self.q_proj(x)))       # (batch, query_pos, head, d_head)
        k = self.hook_k(self._split(self.k_proj(source)))  # (batch, key_pos, head, d_head)
        v = self.hook_v(self._split(self.v_proj(source)))  # (batch, key_pos, head, d_head)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.d_head)  # (batch, head, query_pos, key_pos)
        if causal:
            allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=x.device).tril()  # True = may attend
            mask = allowed if mask is None else mask & allowed
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        pattern = self.hook_pattern(scores.softmax(dim=-1))  # (batch, head, query_pos, key_pos)
        if self.training and self.dropout:
            pattern = F.dropout(pattern, self.dropout)
        z = self.hook_z(torch.einsum("bhqk,bkhd->bqhd", pattern, v))  # (batch, query_pos, head, d_head)
        return self.hook_attn_out(self.out_proj(z.reshape(B, Tq, C)))  # (batch, query_pos, d_model)


class CpuAttention(torch.autograd.Function):
    """dropout(softmax(q·kᵀ/√d_head + mask))·v for training on CPU with dropout, its backward written out.

    With dropout, scaled_dot_product_attention on CPU takes its math path: a dozen recorded ops, copies of the
    strided heads, and torch's softmax, which costs 3-5x more than max/exp/sum/divide over the whole tensor on
    rows shorter than 16 keys (the study's sentences have about 6). Here the heads are copied once, there are
    two batched matmuls forward and four back, and one node in the graph. Forward + backward of one attention
    module measured 1.1-1.5x faster than SDPA's at 8-32 keys at the study's size; at Multi30k's, 1.1-1.2x at 8-12
    and 32-64 keys and the same within noise at 16-24. The dropout mask is `keep_mask`'s, as `Dropout`'s.

    q (batch, query_pos, d_model), k and v (batch, key_pos, d_model) -> z (batch, query_pos, d_model), before the
    output projection. mask: bool, broadcastable to (batch, head, query_pos, key_pos), True = may attend, or None.
    Every query must be allowed at least one key (true of the padding and causal masks here).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # under autocast: fp32, as torch's softmax
    def forward(ctx, q, k, v, mask, causal: bool, p: float, n_heads: int):
        (B, Tq, C), Tk, H = q.shape, k.shape[1], n_heads
        D = C // H
        # (batch, pos, d_model) -> (batch*head, pos, d_head): one copy each, then every matmul is a plain bmm
        q, k, v = (t.view(B, -1, H, D).transpose(1, 2).reshape(B * H, -1, D) for t in (q, k, v))
        scale = 1.0 / math.sqrt(D)
        scores = torch.baddbmm(q.new_empty(()), q, k.transpose(1, 2), beta=0.0, alpha=scale).view(B, H, Tq, Tk)
        if causal:
            mask = torch.ones(Tq, Tk, dtype=torch.bool).tril()
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        pattern = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
        pattern.div_(pattern.sum(dim=-1, keepdim=True))
        pattern = pattern.view(B * H, Tq, Tk)
        keep = keep_mask(pattern, p) if p else None
        dropped = pattern * keep if p else pattern
        ctx.save_for_backward(q, k, v, pattern, keep)
        ctx.scale, ctx.shape = scale, (B, H, Tq, Tk, D)
        z = torch.bmm(dropped, v)  # (batch*head, query_pos, d_head)
        return z.view(B, H, Tq, D).transpose(1, 2).reshape(B, Tq, C)  # (batch, query_pos, d_model)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_z):
        q, k, v, pattern, keep = ctx.saved_tensors
        B, H, Tq, Tk, D = ctx.shape
        grad_z = grad_z.view(B, Tq, H, D).transpose(1, 2).reshape(B * H, Tq, D)
        dropped = pattern * keep if keep is not None else pattern
        grad_v = torch.bmm(dropped.transpose(1, 2), grad_z)
        grad_pattern = torch.bmm(grad_z, v.transpose(1, 2))
        if keep is not None:
            grad_pattern.mul_(keep)
        # softmax's backward: pattern * (g - sum(g * pattern)), then the 1/sqrt(d_head) of the scores
        grad_scores = grad_pattern.sub_((grad_pattern * pattern).sum(dim=-1, keepdim=True)).mul_(pattern)
        grad_scores.mul_(ctx.scale)
        grad_q = torch.bmm(grad_scores, k)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q)

        def back(g, T):  # (batch*head, pos, d_head) -> (batch, pos, d_model)
            return g.view(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)

        return back(grad_q, Tq), back(grad_k, Tk), back(grad_v, Tk), None, None, None, None


def keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout's mask for `like` (CPU): 0 with probability p, else 1 / (1 - p), in like's dtype and shape.

    Each element gets 16 random bits from torch's generator, four to a 64-bit draw, so p counts in steps of
    1/65536 (0.1 is 0.100006, and the kept scale matches it exactly). Drawing the masks is about a tenth of a
    training step at the study's size: this costs half of `rand_like(x) >= p` and a quarter of the `bernoulli_`
    that nn.Dropout draws.
    """
    cut = round(p * 65536)
    if cut >= 65536:
        return torch.zeros_like(like)
    n = like.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, 2 ** 63 - 1)  # every bit uniform
    keep = torch.empty_like(like, memory_format=torch.contiguous_format)
    torch.ge(bits.view(torch.int16)[:n].view(like.shape), cut - 32768, out=keep)  # 1.0 where kept, else 0.0
    return keep.mul_(65536 / (65536 - cut))


class Dropout(nn.Module):
    """Inverted dropout: on CPU with `keep_mask`'s cheaper draws; elsewhere F.dropout."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return x * keep_mask(x, self.p)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T + bias` against `gold`, with its gradients computed in the forward
    pass, a chunk of rows at a time, so the (n_tokens, d_vocab) logits never exist whole.

    At Multi30k size the logits are ~130 MB a batch and the separate log-softmax, its backward and the zero-filled
    gradient each sweep them through memory; one cache-sized chunk at a time, softmax - one-hot is formed in place
    and fed straight to the two gradient matmuls.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # under autocast: the softmax in fp32
    def forward(ctx, hidden, weight, bias, gold, chunk: int):
        N = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)  # (n_tokens, d_model)
        grad_weight = torch.zeros_like(weight)  # (d_vocab, d_model)
        grad_bias = torch.zeros_like(bias)      # (d_vocab,)
        total = hidden.new_zeros(())
        for i in range(0, N, chunk):
            h, g = hidden[i:i + chunk], gold[i:i + chunk]
            logits = torch.addmm(bias, h, weight.t())  # (chunk, d_vocab)
            lse = logits.logsumexp(dim=-1)             # (chunk,)
            total += (lse - logits.gather(1, g[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()   # softmax, in place
            probs[torch.arange(len(g), device=g.device), g] -= 1.0  # d(loss_sum)/d(logits) = softmax - one-hot
            torch.mm(probs, weight, out=grad_hidden[i:i + chunk])
            grad_weight.addmm_(probs.t(), h)
            grad_bias += probs.sum(dim=0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.n = N
        return total / N

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_out / ctx.n
        return grad_hidden * scale, grad_weight * scale, grad_bias * scale, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gold: torch.Tensor,
                         chunk_elements: int = 1 << 23) -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, weight, bias), gold) for hidden (n_tokens, d_model), gold (n_tokens,),
    without materialising the logits; chunks of about `chunk_elements` logits (32 MB in float32: measured
    fastest at Multi30k size, where smaller chunks starve the matmuls)."""
    chunk = max(1, chunk_elements // weight.shape[0])
    return LinearCrossEntropy.apply(hidden, weight, bias, gold, chunk)


class FeedForward(nn.Module):
    """fc2(dropout(relu(fc1(x)))): the tutorial's position-wise feed-forward layer."""

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.relu(self.fc1(x))))  # (batch, pos, d_model)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.self_attn_norm = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.ff_norm = nn.LayerNorm(cfg.d_model)
        self.drop = Dropout(cfg.dropout)
        self.hook_out = HookPoint()  # (batch, src_pos, d_model), the layer's output

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.self_attn_norm(x + self.drop(self.self_attn(x, x, src_mask)))
        x = self.ff_norm(x + self.drop(self.ff(x)))
        return self.hook_out(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.self_attn_norm = nn.LayerNorm(cfg.d_model)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.cross_attn_norm = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.ff_norm = nn.LayerNorm(cfg.d_model)
        self.drop = Dropout(cfg.dropout)
        self.hook_out = HookPoint()  # (batch, tgt_pos, d_model), the layer's output

    def forward(self, x, memory, src_mask):
        # Causal self-attention needs no padding mask: with right padding, a real query never sees a later pad,
        # and pad queries are never read.
        x = self.self_attn_norm(x + self.drop(self.self_attn(x, x, None, causal=True)))
        x = self.cross_attn_norm(x + self.drop(self.cross_attn(x, memory, src_mask)))
        x = self.ff_norm(x + self.drop(self.ff(x)))
        return self.hook_out(x)


class Embedding(nn.Module):
    """Token embedding scaled by sqrt(d_model) plus a learned positional embedding."""

    def __init__(self, d_vocab: int, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(d_vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.scale = math.sqrt(cfg.d_model)
        self.drop = Dropout(cfg.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device)
        return self.drop(self.tok(ids) * self.scale + self.pos(pos))  # (batch, pos, d_model)


class Encoder(nn.Module):
    def __init__(self, d_vocab: int, cfg: ModelConfig):
        super().__init__()
        self.embed = Embedding(d_vocab, cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))

    def forward(self, src, src_mask):
        x = self.embed(src)
        for layer in self.layers:
            x = layer(x, src_mask)
        return x


class Decoder(nn.Module):
    def __init__(self, d_vocab: int, cfg: ModelConfig):
        super().__init__()
        self.embed = Embedding(d_vocab, cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))

    def forward(self, tgt, memory, src_mask):
        x = self.embed(tgt)
        for layer in self.layers:
            x = layer(x, memory, src_mask)
        return x


class Transformer(nn.Module):
    """Encoder-decoder translation Transformer; `encode`/`decode` split as in the annotated Transformer."""

    def __init__(self, cfg: ModelConfig, d_vocab_src: int, d_vocab_tgt: int, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(d_vocab_src, cfg)
        self.decoder = Decoder(d_vocab_tgt, cfg)
        self.lm_head = nn.Linear(cfg.d_model, d_vocab_tgt)
        # Xavier init as in the tutorial, from a generator of our own: no global seeding.
        g = torch.Generator().manual_seed(seed)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p, generator=g)
        for m in self.modules():
            if isinstance(m, nn.Linear):  # PyTorch's default bias init, redrawn from our generator
                bound = 1 / math.sqrt(m.in_features)
                nn.init.uniform_(m.bias, -bound, bound, generator=g)

    @staticmethod
    def src_mask(src: torch.Tensor) -> torch.Tensor | None:
        """(batch, 1, 1, src_pos) bool, True = may attend (not padding); None when the batch has no padding."""
        keep = src != PAD_ID
        return None if bool(keep.all()) else keep[:, None, None, :]

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor:
        """src (batch, src_pos) ids -> memory (batch, src_pos, d_model)."""
        return self.encoder(src, src_mask)

    def decode(self, memory: torch.Tensor, src_mask: torch.Tensor | None, tgt: torch.Tensor) -> torch.Tensor:
        """tgt (batch, tgt_pos) ids, causal -> hidden states (batch, tgt_pos, d_model), before lm_head."""
        return self.decoder(tgt, memory, src_mask)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (batch, tgt_pos, d_vocab_tgt)."""
        mask = self.src_mask(src)
        return self.lm_head(self.decode(self.encode(src, mask), mask, tgt_in))

    def loss(self, src: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Mean cross-entropy over the non-pad next tokens of `tgt` (batch, tgt_pos) given `tgt[:, :-1]`.

        Returns (loss, n_tokens, n_correct); n_correct is None in training mode. Logits are computed for non-pad positions only: the output softmax
        is the largest single cost at small d_model, and padding is pure waste there.
        """
        mask = self.src_mask(src)
        hidden = self.decode(self.encode(src, mask), mask, tgt[:, :-1])  # (batch, tgt_pos-1, d_model)
        gold = tgt[:, 1:]
        keep = gold != PAD_ID
        if bool(keep.all()):  # bucketed batches often have no padding: skip the gather and its backward
            hidden, gold = hidden.reshape(-1, hidden.shape[-1]), gold.reshape(-1)
        else:
            hidden, gold = hidden[keep], gold[keep]
        if self.training and hidden.device.type == "cpu" and torch.is_grad_enabled():
            # Training on CPU: the fused, chunked loss (the output softmax dominates memory traffic there).
            loss = linear_cross_entropy(hidden, self.lm_head.weight, self.lm_head.bias, gold)
            return loss, int(gold.numel()), None
        logits = self.lm_head(hidden)  # (n_tokens, d_vocab_tgt)
        loss = F.cross_entropy(logits, gold)
        # The argmax costs as much as the log-softmax at Multi30k size: only evaluation pays for it.
        n_correct = None if self.training else int((logits.argmax(-1) == gold).sum())
        return loss, int(gold.numel()), n_correct

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, max_len: int | None = None) -> list[list[int]]:
        """Greedy translations of src (batch, src_pos): per sentence the predicted ids after <sos>, up to and
        including <eos> (or max_len tokens)."""
        max_len = min(max_len or self.cfg.max_len, self.cfg.max_len)
        mask = self.src_mask(src)
        memory = self.encode(src, mask)
        B = src.shape[0]
        ys = torch.full((B, 1), SOS_ID, dtype=torch.long, device=src.device)  # (batch, tgt_pos)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        for _ in range(max_len - 1):
            next_id = self.lm_head(self.decode(memory, mask, ys)[:, -1]).argmax(-1)  # (batch,)
            next_id = next_id.masked_fill(done, PAD_ID)
            ys = torch.cat([ys, next_id[:, None]], dim=1)
            done |= next_id == EOS_ID
            if bool(done.all()):
                break
        out = []
        for row in ys[:, 1:].tolist():
            row = [t for t in row if t != PAD_ID]
            out.append(row[: row.index(EOS_ID) + 1] if EOS_ID in row else row)
        return out

    def hook_names(self) -> list[str]:
        """Every hook point's name (its module path), in forward order."""
        return [name for name, m in self.named_modules() if isinstance(m, HookPoint)]
