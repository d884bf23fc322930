"""PARACHUTE fusion (eq. 4-7) generalised from two to M modalities.

Notation: B patients; modality m has adapter tokens h_m [B, T_m, D_inter] and
fusion tokens z_m [B, T_m, d] (HAF projection + modality-type embedding) with a
token mask [B, T_m]. An absent modality already carries its learned missing
tokens (one valid token) when it reaches this module.

**Generalisation to M modalities.** PARACHUTE has two streams, radiology (X)
and pathology (Y). We split the model's modalities into two streams by kind
(``ModelConfig.x_stream_kinds``, default sequence + tabular -> X; vector + bag
-> Y). A stream's token sequence is the concatenation of its modalities'
fusion tokens (with key-padding masks), so for the two PARACHUTE modalities
this is exactly the paper's X = radiology, Y = pathology. If one stream is
empty (e.g. a tabular-only federation) the other stream is used for both.
LocXEmb is computed for every cross-stream pair (m_x in X, m_y in Y) and the
statistics are concatenated: gamma [B, 2 * n_pairs] (2 when M = 2, as in eq. 4).

**Each patient is its own sequence** (DESIGN §3 defect 3): attention runs over
a patient's tokens only (batch_first, key-padding masks), and all pooling is
masked, so a prediction does not depend on the other patients of the batch (in
training, the CT adapter's BatchNorm still uses the batch's statistics: encoders.py).

Deviations:

* eq. 7 writes f_V = MHCA_1(h^x, h^y, h^x + h^y), but values must align with the
  keys (T_y tokens) while h^x has T_x tokens; X enters the values as its masked
  mean: V = Y + pool(X).
* Blocks are pre-LayerNorm (out = q + Attn(LN q, LN k, LN v [+ e]); out + FFN(LN out)),
  more stable than the post-LN of the paper's text, and the pooled fused
  vector gets a final LayerNorm. The DCE bias e(b) is added to the normalised
  value tokens before the value projection: since attention weights sum to 1
  this is the paper's softmax(QK^T)(V + e) with e mapped by W^V.
* LocXEmb: k = min(topk, number of valid entries) per patient (short sequences);
  an absent modality contributes its learned missing adapter token ("learned
  modality prior", §3.4.1).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x [B, T, d] over valid tokens (mask [B, T]) -> [B, d] (0 if none)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def topk_similarity_stats(
    hx: Tensor, mx: Tensor, hy: Tensor, my: Tensor, topk: int
) -> Tensor:
    """LocXEmb statistics of one modality pair (PARACHUTE eq. 4).

    S^(b) = hx_hat hy_hat^T over valid tokens (L2-normalised); P+ = mean of the
    top-k entries, P- = mean of the bottom-k entries of the flattened valid S,
    k = min(topk, #valid entries) per patient.

    Args: hx [B, Tx, D], mx bool [B, Tx], hy [B, Ty, D], my bool [B, Ty].
    Returns [B, 2] = [P+, P-].
    """
    b = hx.shape[0]
    s = torch.einsum("bxd,byd->bxy", F.normalize(hx, dim=-1, eps=1e-8), F.normalize(hy, dim=-1, eps=1e-8))
    valid = (mx.unsqueeze(2) & my.unsqueeze(1)).reshape(b, -1)
    s = s.reshape(b, -1)
    kmax = min(topk, s.shape[1])
    n_valid = valid.sum(dim=1)
    k = n_valid.clamp(min=1, max=kmax)  # every patient has >= 1 valid entry (missing tokens)
    take = torch.arange(kmax, device=s.device)[None, :] < k[:, None]
    top = torch.topk(s.masked_fill(~valid, float("-inf")), kmax, dim=1).values
    bottom = torch.topk(s.masked_fill(~valid, float("inf")), kmax, dim=1, largest=False).values
    kf = k.to(s.dtype)
    p_plus = torch.where(take, top, torch.zeros_like(top)).sum(dim=1) / kf
    p_minus = torch.where(take, bottom, torch.zeros_like(bottom)).sum(dim=1) / kf
    return torch.stack([p_plus, p_minus], dim=1)


class DynamicContextEmbedding(nn.Module):
    """DCE (PARACHUTE eq. 5): e(b) = Linear(MLP(gamma(b))) + m(b) * t_miss.

    ``t_miss`` is not held here: it is the model's ``dce_missing`` group and is
    passed to :meth:`forward`, so the server can weight it by the patients with
    m(b) = 1.
    """

    def __init__(self, n_stats: int, dce_dim: int, d: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(n_stats, dce_dim), nn.GELU(), nn.Linear(dce_dim, dce_dim))
        self.out = nn.Linear(dce_dim, d)

    def forward(self, gamma: Tensor, missing_flag: Tensor, t_miss: Tensor) -> Tensor:
        """gamma [B, n_stats], missing_flag float [B] -> e [B, d]."""
        return self.out(self.mlp(gamma)) + missing_flag.unsqueeze(1) * t_miss.unsqueeze(0)


class CrossAttentionBlock(nn.Module):
    """Pre-LN multi-head cross-attention block with optional value bias (eq. 6-7).

    out = q + Dropout(MHA(LN q, LN k, LN v + bias; key_padding_mask));
    out = out + FFN(LN out), FFN = Linear(d, mult*d) -> GELU -> Dropout -> Linear -> Dropout.
    """

    def __init__(self, d: int, n_heads: int, attn_dropout: float, dropout: float, ffn_mult: int) -> None:
        super().__init__()
        if d % n_heads:
            raise ValueError(f"d_token={d} must be divisible by n_heads={n_heads}")
        self.ln_q = nn.LayerNorm(d)
        self.ln_k = nn.LayerNorm(d)
        self.ln_v = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, n_heads, dropout=attn_dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.ln_ffn = nn.LayerNorm(d)
        self.ffn = nn.Sequential(
            nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(ffn_mult * d, d), nn.Dropout(dropout),
        )

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, value_bias: Tensor | None = None
    ) -> Tensor:
        """q [B, Tq, d]; k, v [B, Tk, d]; key_mask bool [B, Tk] (True = real token);
        value_bias [B, d] or None. Returns [B, Tq, d]."""
        vv = self.ln_v(v)
        if value_bias is not None:
            vv = vv + value_bias.unsqueeze(1)
        a, _ = self.attn(self.ln_q(q), self.ln_k(k), vv, key_padding_mask=~key_mask, need_weights=False)
        out = q + self.drop(a)
        return out + self.ffn(self.ln_ffn(out))


class ParachuteFusion(nn.Module):
    """LocXEmb + DCE + four MHCA blocks over two modality streams (eq. 4-7).

    ``kinds`` gives each modality's kind in model order; ``x_stream_kinds``
    decides the streams (see module docstring). Holds the modality-type
    embeddings e_m [M, d] (fusion group).
    """

    def __init__(
        self,
        kinds: Sequence[str],
        x_stream_kinds: Sequence[str],
        d_token: int,
        n_heads: int,
        attn_dropout: float,
        dropout: float,
        ffn_mult: int,
        topk: int,
        dce_dim: int,
        use_dce: bool,
    ) -> None:
        super().__init__()
        m = len(kinds)
        x_idx = [i for i, k in enumerate(kinds) if k in x_stream_kinds]
        y_idx = [i for i, k in enumerate(kinds) if k not in x_stream_kinds]
        if not x_idx:
            x_idx = y_idx
        if not y_idx:
            y_idx = x_idx
        self.x_idx = tuple(x_idx)
        self.y_idx = tuple(y_idx)
        # cross-stream pairs; with one stream, distinct pairs within it (or the
        # single modality with itself)
        if set(x_idx) == set(y_idx):
            pairs = [(i, j) for i in x_idx for j in y_idx if i < j] or [(x_idx[0], x_idx[0])]
        else:
            pairs = [(i, j) for i in x_idx for j in y_idx]
        self.pairs = tuple(pairs)
        self.topk = topk
        self.use_dce = use_dce
        self._index_cache: dict = {}
        self.modality_embedding = nn.Parameter(torch.randn(m, d_token) * 0.02)
        self.dce = DynamicContextEmbedding(2 * len(pairs), dce_dim, d_token)

        def block() -> CrossAttentionBlock:
            return CrossAttentionBlock(d_token, n_heads, attn_dropout, dropout, ffn_mult)

        self.mhca_v = block()
        self.mhca_k = block()
        self.mhca_q = block()
        self.mhca_fuse = block()
        self.out_norm = nn.LayerNorm(d_token)

    def locxemb(self, adapter: Sequence[Tensor], masks: Sequence[Tensor]) -> Tensor:
        """gamma [B, 2 * n_pairs]: eq. 4 for every cross-stream modality pair.

        One batched similarity S = X_hat Y_hat^T over all X-stream vs Y-stream
        adapter tokens; each pair's block of S is gathered (padded to the largest
        block) and reduced with a masked top-k / bottom-k. Equals
        :func:`topk_similarity_stats` pair by pair.
        """
        xs = [F.normalize(adapter[i], dim=-1, eps=1e-8) for i in self.x_idx]
        ys = [F.normalize(adapter[j], dim=-1, eps=1e-8) for j in self.y_idx]
        x = torch.cat(xs, dim=1)
        y = torch.cat(ys, dim=1)
        mx = torch.cat([masks[i] for i in self.x_idx], dim=1)
        my = torch.cat([masks[j] for j in self.y_idx], dim=1)
        b, tx, ty = x.shape[0], x.shape[1], y.shape[1]
        s = torch.bmm(x, y.transpose(1, 2)).reshape(b, tx * ty)
        valid = (mx.unsqueeze(2) & my.unsqueeze(1)).reshape(b, tx * ty)
        index, in_block = self._pair_index(
            tuple(adapter[i].shape[1] for i in self.x_idx), tuple(adapter[j].shape[1] for j in self.y_idx),
            s.device,
        )
        vals = s[:, index]  # [B, n_pairs, L]
        ok = valid[:, index] & in_block
        kmax = min(self.topk, vals.shape[2])
        k = ok.sum(dim=2).clamp(min=1, max=kmax)  # [B, n_pairs]; >= 1 valid entry always
        take = torch.arange(kmax, device=s.device) < k.unsqueeze(2)
        top = torch.topk(vals.masked_fill(~ok, float("-inf")), kmax, dim=2).values
        bottom = torch.topk(vals.masked_fill(~ok, float("inf")), kmax, dim=2, largest=False).values
        kf = k.to(vals.dtype)
        p_plus = torch.where(take, top, torch.zeros_like(top)).sum(dim=2) / kf
        p_minus = torch.where(take, bottom, torch.zeros_like(bottom)).sum(dim=2) / kf
        return torch.stack([p_plus, p_minus], dim=2).reshape(b, -1)

    def _pair_index(
        self, tx: tuple[int, ...], ty: tuple[int, ...], device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """Flat indices into S [TX * TY] of every pair's block, [n_pairs, L], and block validity."""
        key = (tx, ty, str(device))
        hit = self._index_cache.get(key)
        if hit is not None:
            return hit
        x_off = {i: sum(tx[:n]) for n, i in enumerate(self.x_idx)}
        y_off = {j: sum(ty[:n]) for n, j in enumerate(self.y_idx)}
        x_len = dict(zip(self.x_idx, tx))
        y_len = dict(zip(self.y_idx, ty))
        total_ty = sum(ty)
        blocks = []
        for i, j in self.pairs:
            rows = torch.arange(x_len[i]) + x_off[i]
            cols = torch.arange(y_len[j]) + y_off[j]
            blocks.append((rows[:, None] * total_ty + cols[None, :]).reshape(-1))
        length = max(len(bl) for bl in blocks)
        index = torch.zeros(len(blocks), length, dtype=torch.long)
        in_block = torch.zeros(len(blocks), length, dtype=torch.bool)
        for n, bl in enumerate(blocks):
            index[n, : len(bl)] = bl
            in_block[n, : len(bl)] = True
        out = (index.to(device), in_block.to(device))
        if len(self._index_cache) > 256:
            self._index_cache.clear()
        self._index_cache[key] = out
        return out

    def forward(
        self,
        adapter: Sequence[Tensor],
        tokens: Sequence[Tensor],
        masks: Sequence[Tensor],
        missing_flag: Tensor,
        t_miss: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Fuse one batch.

        Args (lists in model order, one entry per modality):
            adapter: [B, T_m, D_inter] adapter tokens (missing token for absent);
            tokens: [B, T_m, d] fusion tokens *without* the type embedding;
            masks: bool [B, T_m];
            missing_flag: float [B], m(b) of eq. 5; t_miss [d].
        Returns (fused f [B, d], gamma [B, 2 * n_pairs]).
        """
        z = [tokens[i] + self.modality_embedding[i] for i in range(len(tokens))]
        x = torch.cat([z[i] for i in self.x_idx], dim=1)
        mx = torch.cat([masks[i] for i in self.x_idx], dim=1)
        y = torch.cat([z[i] for i in self.y_idx], dim=1)
        my = torch.cat([masks[i] for i in self.y_idx], dim=1)
        gamma = self.locxemb(adapter, masks)
        if self.use_dce:
            e = self.dce(gamma, missing_flag, t_miss)
        else:
            e = None  # ablation -DCE: e(b) = 0
        pooled_x = masked_mean(x, mx).unsqueeze(1)
        f_v = self.mhca_v(x, y, y + pooled_x, my)  # [B, Tx, d]
        f_k = self.mhca_k(x, y, y, my)  # [B, Tx, d]
        f_q = self.mhca_q(y, x, x, mx)  # [B, Ty, d]
        fused = self.mhca_fuse(f_q, f_k, f_v, mx, value_bias=e)  # [B, Ty, d]
        return self.out_norm(masked_mean(fused, my)), gamma


class ConcatFusion(nn.Module):
    """Naive concatenation fusion — the baseline of HAF's "All-Modality Fusion MLP"
    (HAF Table 1) and PARACHUTE's concatenation ablation (Fig. 2d).

    Each modality's fusion tokens (or its missing token) are mean-pooled, the M
    pooled vectors are concatenated [B, M*d] and an MLP maps them to f [B, d].
    No LocXEmb, no DCE, no attention; same call signature as
    :class:`ParachuteFusion` so everything else (missing tokens, heads, GCS,
    training) is unchanged. ``gamma`` is returned empty ([B, 0]).
    """

    def __init__(self, n_modalities: int, d: int, dropout: float) -> None:
        super().__init__()
        self.modality_embedding = nn.Parameter(torch.zeros(n_modalities, d))
        self.mlp = nn.Sequential(
            nn.Linear(n_modalities * d, 2 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * d, d)
        )
        self.out_norm = nn.LayerNorm(d)

    def forward(
        self,
        adapter: Sequence[Tensor],
        tokens: Sequence[Tensor],
        masks: Sequence[Tensor],
        missing_flag: Tensor,
        t_miss: Tensor,
    ) -> tuple[Tensor, Tensor]:
        pooled = [masked_mean(tokens[i] + self.modality_embedding[i], masks[i]) for i in range(len(tokens))]
        h = torch.cat(pooled, dim=1)
        return self.out_norm(self.mlp(h)), h.new_zeros(h.shape[0], 0)
