"""Chapter 01's graded checks: the fused row softmax, the online softmax update, one FlashAttention tile.

The exercises are bodies of Triton kernels. Each check installs the learner's kernel (or, for 1.3, the tile
loop `_fwd_tiles`) in the library's module for the duration of one call, runs the library's own launcher under
Triton's interpreter on the CPU (TRITON_INTERPRET=1, which `import kernels` sets when there is no GPU), and
compares the result with a float64 oracle written out here. The cases reach what a kernel gets wrong: rows and
sequences whose length is not a multiple of the block (masked lanes), scores of +-1e4 in float32 (an unshifted
exp overflows), rows of -inf and rows that see no key at all, several tiles per row (a missing or wrong rescale
shows), causal and non-causal masks, float16 inputs. Shapes are small: the interpreter runs one program at a
time. Known-wrong solutions: exercises/grading/mutants/ch01_kernels_flash_attention.md.
"""

import math

import torch

import kernels.flash_attention as fa
import kernels.softmax as ks
from exercises.grading.checking import Exercise, Violation, check
from exercises.grading.checks.common import installed

F32, F16 = torch.float32, torch.float16


def _randn(*shape, seed: int, scale: float = 1.0, dtype=F32) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over entries, NaN counted as infinitely wrong; equal infinities count as equal."""
    a, b = a.double(), b.double()
    same = (a == b) | (a.isnan() & b.isnan())
    return torch.where(same, 0.0, (a - b).abs().nan_to_num(nan=math.inf)).max().item() if a.numel() else 0.0


def _why(got: torch.Tensor) -> str:
    bad = (~torch.isfinite(got)).sum().item()
    return (f"; {bad} entries are NaN or inf (did exp overflow, or did exp(-inf - (-inf)) give NaN?)" if bad
            else "")


def softmax_oracle(x: torch.Tensor) -> torch.Tensor:
    """exp(x - max) / sum exp(x - max) over the last axis, in float64 (-inf entries get 0)."""
    x = x.double()
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _expect_softmax(got: torch.Tensor, x: torch.Tensor, tol: float, case: str) -> None:
    if type(got) is not torch.Tensor or got.shape != x.shape or got.dtype != x.dtype:
        raise Violation(f"{case}: the kernel's output is {getattr(got, 'dtype', type(got))} "
                        f"{tuple(getattr(got, 'shape', ()))}, expected {x.dtype} {tuple(x.shape)}")
    want = softmax_oracle(x)
    err = _diff(got, want)
    if err > tol:
        row, col = divmod(int(((got.double() - want).abs().nan_to_num(nan=math.inf)).argmax()), x.size(-1))
        sums = got.double().sum(-1)
        raise Violation(f"{case}: the output differs from softmax by {err:.3g} (tolerance {tol:g}), first at row "
                        f"{row}, column {col}: got {got[row, col].item():.6g}, expected {want[row, col].item():.6g}; "
                        f"row sums range over [{sums.min().item():.6g}, {sums.max().item():.6g}]{_why(got)}")


# ---- 1.1 the fused row softmax ---------------------------------------------------------------------------
# corner cases (each pinned as a fixed case below, no random draws): n_cols = 1 (BLOCK 1); n_cols a power of two
# (no padding lane: 64); not a power of two, with every entry below the fill value; one row; rows of -inf
# entries; +-1e4 scores; float16; a strided input view and an out= view inside a guard band.

def _block(n: int) -> int:
    """The fused kernel's BLOCK for a row of n columns: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


def _fused(graded, x: torch.Tensor) -> torch.Tensor:
    with installed(ks, "_softmax_kernel", graded):
        return ks.softmax(x)


@check("each row's output is softmax of its n_cols entries, for lengths that are not a power of two: the block's "
       "padding lanes (columns n_cols..BLOCK-1) take no probability mass, whatever the sign of the row")
def fused_softmax_masks_the_padding(_softmax_kernel):
    for rows, n_cols, shift in ((3, 1, 0.0), (3, 5, 0.0), (3, 37, -20.0), (3, 100, 3.0), (3, 130, -3.0),
                                (1, 64, -5.0)):  # BLOCK: 1, 8, 64, 128, 256, 64 (one row, no padding)
        x = _randn(rows, n_cols, seed=n_cols) * 2 + shift  # shift -20: every entry below 0, the fill value
        _expect_softmax(_fused(_softmax_kernel, x), x, 1e-6,
                        f"rows of {n_cols} columns (BLOCK {_block(n_cols)}, values around {shift:g})")


@check("scores of +-1e4 in float32 give softmax, not NaN: exp(x) overflows float32 above 88, exp(x - max) never "
       "exceeds 1")
def fused_softmax_survives_wide_scores(_softmax_kernel):
    x = _randn(4, 50, seed=1, scale=1e4)
    x[1] = torch.linspace(-1e4, 1e4, 50)
    x[2] = -1e4 + _randn(50, seed=2)  # every entry near -1e4: an unshifted exp underflows to 0 / 0
    _expect_softmax(_fused(_softmax_kernel, x), x, 1e-6, "rows with scores of +-1e4 (float32)")


@check("rows holding -inf (masked scores) give them probability 0 and softmax over the rest; float16 rows are "
       "computed in float32 and stored as float16")
def fused_softmax_masked_scores_and_float16(_softmax_kernel):
    x = _randn(3, 40, seed=3, scale=3.0)
    x[0, :30] = -math.inf
    x[1, 1::2] = -math.inf
    _expect_softmax(_fused(_softmax_kernel, x), x, 1e-6, "rows with -inf entries")
    h = _randn(4, 70, seed=4, scale=4.0, dtype=F16)
    _expect_softmax(_fused(_softmax_kernel, h), h, 1e-3, "float16 rows of 70 columns")


@check("x a strided view (rows further apart than n_cols) and out= a view inside a guard band: row r is read "
       "from X + r * stride_x, written to out's rows only, and no entry of the band around out changes")
def fused_softmax_strided_input_and_out(_softmax_kernel):
    for n_cols in (5, 37):
        big = _randn(4, n_cols + 11, seed=n_cols + 1, scale=3.0)
        x = big[:, 3:3 + n_cols]  # stride_x = n_cols + 11, a view with an offset
        band = torch.full((6, n_cols + 9), 7.25, dtype=F32)
        out = band[1:5, 4:4 + n_cols]  # stride_y = n_cols + 9
        with installed(ks, "_softmax_kernel", _softmax_kernel):
            got = ks.softmax(x, out=out)
        if got.data_ptr() != out.data_ptr():
            raise Violation(f"softmax(x, out=out) returned a new tensor, not out (n_cols = {n_cols})")
        _expect_softmax(out.clone(), x.contiguous(), 1e-6,
                        f"x = a view of rows {n_cols + 11} apart, out= a view of rows {n_cols + 9} apart")
        outside = band.clone()
        outside[1:5, 4:4 + n_cols] = 7.25
        if not torch.equal(outside, torch.full_like(band, 7.25)):
            raise Violation(f"n_cols = {n_cols}: the kernel wrote outside out's rows (the guard band around out "
                            "changed): store row r at Y + r * stride_y, columns < n_cols only")


# ---- 1.2 the online softmax update ---------------------------------------------------------------------------
# corner cases: one tile (BLOCK_N >= n); a short last tile; n an exact multiple of BLOCK_N (no short tile: 64 in
# tiles of 16); the max in the first, last or middle tile; whole tiles of -inf first (the running max still
# -inf); +-1e4; float16. All pinned as fixed cases.

def _online(graded, x: torch.Tensor, block_n: int) -> torch.Tensor:
    with installed(ks, "_online_softmax_kernel", graded):
        return ks.online_softmax(x, block_n=block_n)


@check("walking the row in tiles of BLOCK_N gives softmax of the whole row, for 1 to 6 tiles and a short last "
       "tile, whether the max rises, falls or sits in the middle (what is summed under an old max is rescaled)")
def online_softmax_matches_softmax_over_tiles(_online_softmax_kernel):
    n = 83
    t = torch.arange(n, dtype=torch.float64)
    x = torch.stack([t / 4, -t / 4, -(t - 40).abs() / 4, 3 * torch.sin(t)]).float() + _randn(4, n, seed=5) * 0.1
    for block_n in (16, 32, 128):
        _expect_softmax(_online(_online_softmax_kernel, x, block_n), x, 1e-6,
                        f"rows of {n} columns in {math.ceil(n / block_n)} tile(s) of BLOCK_N = {block_n} (row 0 "
                        "rises, row 1 falls, row 2 peaks in the middle, row 3 oscillates)")
    exact = x[:, :64].contiguous()
    _expect_softmax(_online(_online_softmax_kernel, exact, 16), exact, 1e-6,
                    "rows of 64 columns in exactly 4 tiles of BLOCK_N = 16 (no short last tile)")


@check("scores of +-1e4 in float32: the running max keeps every exp() at most 1, so a row whose later tiles are "
       "1e4 below (or above) its first tile still gives softmax, not NaN or inf")
def online_softmax_survives_wide_scores(_online_softmax_kernel):
    n = 70
    x = _randn(4, n, seed=6)
    x[0, :16] += 1e4  # the max in the first tile, later tiles 1e4 below it
    x[1, 48:] += 1e4  # the max in the last tile
    x[2] = _randn(n, seed=7, scale=1e4)
    x[3] -= 1e4
    _expect_softmax(_online(_online_softmax_kernel, x, 16), x, 1e-6,
                    "rows of 70 columns, tiles of 16, scores of +-1e4 (float32)")


@check("whole tiles of -inf (masked scores) before, between and after the finite values add nothing and make no "
       "NaN; float16 rows are computed in float32")
def online_softmax_masked_tiles_and_float16(_online_softmax_kernel):
    x = _randn(4, 75, seed=8, scale=3.0)
    x[0, :40] = -math.inf  # two and a half tiles with no finite value yet
    x[1, 16:48] = -math.inf
    x[2, 30:] = -math.inf
    x[3, ::3] = -math.inf
    _expect_softmax(_online(_online_softmax_kernel, x, 16), x, 1e-6,
                    "rows of 75 columns, tiles of 16, runs of -inf (row 0 starts with 40)")
    h = _randn(3, 90, seed=9, scale=4.0, dtype=F16)
    _expect_softmax(_online(_online_softmax_kernel, h, 32), h, 1e-3, "float16 rows of 90 columns, tiles of 32")


# ---- 1.3 one key/value tile of the FlashAttention forward ----------------------------------------------------
# corner cases: one key tile and several; a short last key tile; Tq < Tk (cached keys before the queries, causal
# offset Tk - Tq); one query decoding after 99 cached keys (Tq = 1, causal); query 0 seeing key 0 only; a prefix
# (seq2seq); per-batch key lengths, one of them 0 (an empty row: O = 0, LSE = -inf); V with rows H * D apart;
# +-1e4 scores; float16. All pinned as fixed cases.

def attention_oracle(q, k, v, *, causal=False, prefix_len=None, key_lengths=None):
    """O = softmax(Q K^T / sqrt(D) masked) V and LSE = logsumexp of the masked scores, float64. Query i sits at
    position i + Tk - Tq; key j is visible when j < key_len[b] and (causal: j <= position; prefix: j < P or
    j <= position). A row that sees no key: O = 0, LSE = -inf."""
    B, H, t_q, D = q.shape
    t_k = k.size(2)
    pos = torch.arange(t_q)[:, None] + (t_k - t_q)
    j = torch.arange(t_k)[None, :]
    key_len = torch.as_tensor(key_lengths if key_lengths is not None else [t_k] * B).reshape(B, 1, 1, 1)
    allowed = (j < key_len).expand(B, H, t_q, t_k)
    if prefix_len is not None:
        allowed = allowed & ((j < prefix_len) | (j <= pos))
    elif causal:
        allowed = allowed & (j <= pos)
    s = (q.double() @ k.double().transpose(-2, -1) / math.sqrt(D)).masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    seen = torch.isfinite(lse)
    p = torch.where(seen[..., None], torch.exp(s - torch.where(seen, lse, 0.0)[..., None]), 0.0)
    return p @ v.double(), lse


def _flash(graded, q, k, v, **mask):
    with installed(fa, "_fwd_tiles", graded):
        return fa.flash_attention_forward(q, k, v, **mask)


def _expect_attention(graded, q, k, v, o_tol: float, lse_tol: float, case: str, **mask) -> None:
    out, lse = _flash(graded, q, k, v, **mask)
    want_out, want_lse = attention_oracle(q, k, v, **mask)
    tiles = f"{math.ceil(k.size(2) / 64)} key tile(s) of 64"
    where = f"{case} (Tq = {q.size(2)}, Tk = {k.size(2)}, {tiles}, {q.dtype})"
    if torch.isnan(out).any() or torch.isnan(lse).any():
        rows = torch.isnan(out).any(-1) | torch.isnan(lse)
        b, h, i = rows.nonzero()[0].tolist()
        raise Violation(f"{where}: NaN in {int(rows.sum())} rows, first (batch {b}, head {h}, query {i}): "
                        "exp(-inf - (-inf)) is NaN, and so are inf - inf and inf * 0 after an exp() overflowed")
    e_out, e_lse = _diff(out, want_out), _diff(lse, want_lse)
    lse_bad = ~torch.isclose(lse.double(), want_lse, rtol=lse_tol, atol=lse_tol)  # relative: LSE reaches 1e4
    if e_out > o_tol or lse_bad.any():
        bad = ((out.double() - want_out).abs().nan_to_num(nan=math.inf).amax(-1) > o_tol) | lse_bad
        b, h, i = bad.nonzero()[0].tolist() if bad.any() else (0, 0, 0)
        raise Violation(f"{where}: O differs from softmax(QK^T / sqrt(D)) V by {e_out:.3g} (tolerance {o_tol:g}), "
                        f"LSE by {e_lse:.3g}; first wrong row: batch {b}, head {h}, query {i}, LSE "
                        f"{lse[b, h, i].item():.6g}, expected {want_lse[b, h, i].item():.6g}{_why(out)}")


@check("O = softmax(Q K^T / sqrt(D)) V and LSE = logsumexp of the scores, for 1 to 3 key tiles with a short "
       "last tile and 1 to 3 query tiles, bidirectional and causal, V in (B, T, H, D) memory (what was accumulated under an old max is "
       "rescaled by exp(m_old - m_new), once, at the end divided by l)")
def flash_tile_matches_attention(_fwd_tiles):
    for t_q, t_k, causal in ((70, 150, False), (150, 150, True), (40, 100, True), (20, 33, False), (1, 100, True)):
        q, k, v = (_randn(1, 2, t, 16, seed=t_q + t_k + i) for i, t in enumerate((t_q, t_k, t_k)))
        q = q * 2  # peaked rows: the running max moves between tiles
        _expect_attention(_fwd_tiles, q, k, v, 1e-5, 1e-6, "causal" if causal else "bidirectional", causal=causal)
    q, k, v = (_randn(1, 2, t, 16, seed=60 + i) for i, t in enumerate((40, 90, 90)))
    v_rows = v.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) memory: V's rows H * D = 32 apart
    _expect_attention(_fwd_tiles, q, k, v_rows, 1e-5, 1e-6, "bidirectional, V's rows 32 apart (stride_vt != D)")


@check("scores of +-1e4 in float32: a row whose max lies in its first key tile and whose later tiles are far "
       "below (or above) gives O and LSE, not NaN or inf: every exp() is taken relative to the running max")
def flash_tile_survives_wide_scores(_fwd_tiles):
    q, k, v = (_randn(1, 1, t, 16, seed=30 + i) for i, t in enumerate((70, 150, 150)))
    k[:, :, :64] *= 1e3  # first tile: scores of order 1e3 * |q . k| / 4, up to about 1e4
    k[:, :, 64:] *= -1e2
    _expect_attention(_fwd_tiles, q * 2, k, v, 1e-3, 1e-5, "bidirectional, first key tile scaled by 1e3 and the "
                      "others by -1e2")
    k2 = k.flip(2)  # the large tile last
    _expect_attention(_fwd_tiles, q * 2, k2, v, 1e-3, 1e-5, "causal, the large key tile last", causal=True)


@check("masked keys get no weight: causal (the diagonal included), prefix (seq2seq), key padding that cuts a tile; "
       "a query row that sees no key (key length 0) gets O = 0 and LSE = -inf, never NaN")
def flash_tile_masks_and_empty_rows(_fwd_tiles):
    q, k, v = (_randn(2, 1, t, 16, seed=40 + i) for i, t in enumerate((100, 100, 100)))
    _expect_attention(_fwd_tiles, q, k, v, 1e-5, 1e-6, "prefix 37 (seq2seq) with key lengths 90 and 61",
                      prefix_len=37, key_lengths=[90, 61])
    _expect_attention(_fwd_tiles, q, k, v, 1e-5, 1e-6, "causal, Tq = Tk: query 0 sees key 0 only", causal=True)
    _expect_attention(_fwd_tiles, q[:, :, 30:], k, v, 1e-5, 1e-6, "causal, key lengths 77 and 0 (batch 1 sees "
                      "no key)", causal=True, key_lengths=[77, 0])


@check("float16 Q, K, V: O (float16) and LSE (float32) match the float64 oracle on the same inputs, causal, "
       "over 3 key tiles")
def flash_tile_float16(_fwd_tiles):
    q, k, v = (_randn(1, 2, t, 32, seed=50 + i, dtype=F16) for i, t in enumerate((70, 150, 150)))
    _expect_attention(_fwd_tiles, q, k, v, 2e-3, 1e-3, "causal, float16", causal=True)


EXERCISES = {
    "1.1": Exercise(points=2, checks=[fused_softmax_masks_the_padding, fused_softmax_survives_wide_scores,
                                      fused_softmax_masked_scores_and_float16, fused_softmax_strided_input_and_out],
                    hint="One program holds one whole row, padded to a power of two: the padding lanes must not "
                         "change the max or the sum, and exp() must never see a large positive argument.",
                    hints=("Load the row with its lane mask and a fill value that exp() turns into 0; work in "
                           "float32; subtract the row's largest value before exponentiating.",
                           "x = the masked load (fill -inf) in float32; e = exp of x minus the max of x over the "
                           "block; y = e divided by the sum of e over the block. The store below writes y.")),
    "1.2": Exercise(points=3, checks=[online_softmax_matches_softmax_over_tiles, online_softmax_survives_wide_scores,
                                      online_softmax_masked_tiles_and_float16],
                    hint="The running sum was accumulated relative to the old running max; when a tile raises "
                         "the max, everything summed so far must be brought to the new one.",
                    hints=("The new max is the larger of the old max and the tile's max. Multiply the old sum by "
                           "exp(old max - new max), then add the tile's exponentials taken relative to the new "
                           "max. Before any finite value has been seen the max is -inf: keep exp() away from "
                           "-inf - (-inf).",
                           "m_new = max(m, max of the tile); a reference value equal to m_new, or 0 while m_new is "
                           "still -inf; ell = ell times exp(m - reference) plus the sum over the tile of "
                           "exp(x - reference); finally m becomes m_new (the second walk uses m and ell).")),
    "1.3": Exercise(points=4, checks=[flash_tile_matches_attention, flash_tile_survives_wide_scores,
                                      flash_tile_masks_and_empty_rows, flash_tile_float16],
                    hint="One tile of FlashAttention is the online softmax of 1.2 applied to a block of scores, with "
                         "a running output that has to be rescaled exactly like the running sum.",
                    hints=("Scores = q times the loaded K^T tile times qk_scale (base 2: use exp2). Where MASKED, "
                           "hidden keys get -inf through `_visible`. Update m, then one factor exp2(m_old - m_new) "
                           "rescales both ell and acc; the division by ell happens once, after the loop.",
                           "s from tl.dot(q, kt) scaled; masked with tl.where(_visible(...), s, -inf) when MASKED; "
                           "m_new = row max of s against m; reference = m_new, or 0 where it is -inf; alpha = "
                           "exp2(m - reference); p = exp2(s - reference); ell = ell * alpha + row sum of p; load "
                           "the V tile like K (rows of V, masked by key_len); acc = acc * alpha + p (in V's dtype) "
                           "times V; m = m_new.")),
}
