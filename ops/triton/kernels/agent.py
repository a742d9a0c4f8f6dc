"""Triton kernels of :mod:`zoo.ops.triton.agent` (see its docstring for the computation); imports triton."""
import triton
import triton.language as tl

from .. import interpreter_requested
from .depthwise_conv import input_grad_row, reversed_taps, store_tap_sums

INTERPRETED = interpreter_requested()
"""Whether these kernels were decorated for Triton's CPU interpreter."""


@triton.jit
def _tile(base, rows, n_rows, cols, n_cols, s_row, s_col):
    """A [rows, cols] tile at base + row * s_row + col * s_col; zeros outside (n_rows, n_cols)."""
    ptrs = base + rows[:, None] * s_row + cols[None, :] * s_col
    return tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :], other=0.0)


# The bias logit gradients (float32, a (batch, head)'s A x M agent-key and N x A query-agent logits) are stored in
# rows padded to a multiple of 16 elements (ab_row, qb_row; the pads hold zeros): the launchers specialise such ints
# as divisible by 16, so the masked row stores become 16-byte vectors. Unpadded (rows of 197 or 49 floats, masked by
# the true width) they were scalar stores: the one-launch pooled backward took 129.7-130.7 against 122.6-122.8 us at
# Agent-DeiT-S's block (H200, bf16, batch 64), 80.0-80.1 against 76.9-77.0 at Agent-DeiT-T's (the same gradients).


@triton.jit
def _put(base, rows, n_rows, cols, n_cols, s_row, s_col, value):
    ptrs = base + rows[:, None] * s_row + cols[None, :] * s_col
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :])


@triton.jit
def _agent_program(HEADS, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's batch (int64) and head (grid: batch * heads) and its agent and channel offsets.

    Takes no pointer: torch's Triton mutation analysis counts every argument of a helper whose results reach a
    store address as written, and a written input costs a copy under torch.compile."""
    pid = tl.program_id(0)
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, BLOCK_D)
    return (pid // HEADS).to(tl.int64), pid % HEADS, offs_a, offs_d


@triton.jit
def _backward_program(HEADS, A, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                      BLOCK_T: tl.constexpr):
    """:func:`_agent_program` for the backward kernels: batch, head, the (batch, head) index as int64, the agent,
    channel, value-channel and token offsets and the agents' mask (no pointer, for the same reason)."""
    b, h, offs_a, offs_d = _agent_program(HEADS, BLOCK_A, BLOCK_D)
    return (b, h, tl.program_id(0).to(tl.int64), offs_a, offs_d, tl.arange(0, BLOCK_DV), tl.arange(0, BLOCK_T),
            offs_a < A)


@triton.jit
def _aggregate(agent, k_base, v_base, ab_base, offs_a, offs_d, offs_dv, offs_t, M, A, skn, skd, svn, svd, sba, sbm,
               qk_scale2, D: tl.constexpr, DV: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_T: tl.constexpr, HAS_AB: tl.constexpr, PRECISION: tl.constexpr):
    """Agents aggregate over the keys (online softmax over key tiles): the float32 (BLOCK_A, BLOCK_DV) weighted
    value sums, the running maxima and sums of the base-2 logits."""
    LOG2E: tl.constexpr = 1.4426950408889634
    m_i = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_A], dtype=tl.float32)
    acc = tl.zeros([BLOCK_A, BLOCK_DV], dtype=tl.float32)
    for start in range(0, M, BLOCK_T):
        keys = start + offs_t
        kt = _tile(k_base, keys, M, offs_d, D, skn, skd)
        s = tl.dot(agent, tl.trans(kt), input_precision=PRECISION) * qk_scale2
        if HAS_AB:
            s += _tile(ab_base, offs_a, A, keys, M, sba, sbm).to(tl.float32) * LOG2E
        s = tl.where((keys < M)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = _tile(v_base, keys, M, offs_dv, DV, svn, svd)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _broadcast(q_base, qb_base, rows, offs_a, offs_d, agent, agent_v, a_ok, N, A, sqn, sqd, scn, sca, qk_scale2,
               D: tl.constexpr, HAS_QB: tl.constexpr, PRECISION: tl.constexpr):
    """One query tile reads from the agents (all agents in one tile: a plain softmax): float32 (BLOCK_T, BLOCK_DV)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    qt = _tile(q_base, rows, N, offs_d, D, sqn, sqd)
    s = tl.dot(qt, tl.trans(agent), input_precision=PRECISION) * qk_scale2
    if HAS_QB:
        s += _tile(qb_base, rows, N, offs_a, A, scn, sca).to(tl.float32) * LOG2E
    s = tl.where(a_ok[None, :], s, float("-inf"))
    m = tl.max(s, axis=1)
    p = tl.exp2(s - m[:, None])
    l = tl.sum(p, axis=1)
    return tl.dot(p.to(agent_v.dtype), agent_v, input_precision=PRECISION) / l[:, None]


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, a_ptr, ab_ptr, qb_ptr, out_ptr, av_ptr, lse_ptr,
                    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sab, sah, san, sad,
                    sbb, sbh, sba, sbm, scb, sch, scn, sca,
                    HEADS, N, M, A, qk_scale2,
                    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_A: tl.constexpr, BLOCK_T: tl.constexpr, HAS_AB: tl.constexpr, HAS_QB: tl.constexpr,
                    PRECISION: tl.constexpr, STATS: tl.constexpr):
    qk_scale2 = tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    b, h, offs_a, offs_d = _agent_program(HEADS, BLOCK_A, BLOCK_D)
    agent = _tile(a_ptr + b * sab + h * sah, offs_a, A, offs_d, D, san, sad)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_t = tl.arange(0, BLOCK_T)
    a_ok = offs_a < A

    # 1. agents aggregate over the keys
    acc, m_i, l_i = _aggregate(agent, k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh,
                               ab_ptr + b * sbb + h * sbh, offs_a, offs_d, offs_dv, offs_t, M, A, skn, skd, svn,
                               svd, sba, sbm, qk_scale2, D, DV, BLOCK_A, BLOCK_DV, BLOCK_T, HAS_AB, PRECISION)
    agent_v = (acc / l_i[:, None]).to(agent.dtype)  # the reference's first matmul output dtype
    pid64 = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)  # the query tiles are dealt to the grid's second axis, each split aggregating again
    if STATS and split == 0:  # what the backward needs (inference calls skip the stores and their buffers)
        _put(av_ptr + pid64 * A * DV, offs_a, A, offs_dv, DV, DV, 1, agent_v)
        tl.store(lse_ptr + pid64 * A + offs_a, m_i + tl.log2(l_i), mask=a_ok)

    # 2. queries read from the agents
    q_base = q_ptr + b * sqb + h * sqh
    qb_base = qb_ptr + b * scb + h * sch
    out_base = out_ptr + b * N * HEADS * DV + h * DV
    for start in range(split * BLOCK_T, N, BLOCK_T * tl.num_programs(1)):
        rows = start + offs_t
        o = _broadcast(q_base, qb_base, rows, offs_a, offs_d, agent, agent_v, a_ok, N, A, sqn, sqd, scn, sca,
                       qk_scale2, D, HAS_QB, PRECISION)
        # no per-query statistics are stored: the backward recomputes this one-tile softmax, and a store here
        # made the training forward 2.4x slower at Agent-Swin-T stage 2 (H200, default tiles: 242 against 102 us)
        _put(out_base, rows, N, offs_dv, DV, HEADS * DV, 1, o)


@triton.jit
def _windows(offs_a, H, W, GA, GB):
    """The adaptive-average-pooling windows (ATen's) of agents ``offs_a`` of a (GA, GB) grid over an (H, W) map
    (agent a: window row a // GB, column a % GB): their top, bottom, left and right edges (bottom and right
    exclusive)."""
    i, j = offs_a // GB, offs_a % GB
    top, bottom = (i * H) // GA, ((i + 1) * H + GA - 1) // GA  # ceil division without negative operands (C's
    left, right = (j * W) // GB, ((j + 1) * W + GB - 1) // GB    # integer division truncates towards zero)
    return top, bottom, left, right


@triton.jit
def _pooled_agents(q_base, offs_a, offs_d, offs_t, N, sqn, sqd, PREFIX, H, W, GA, GB,
                   D: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                   ROUND_SUMS: tl.constexpr, PRECISION: tl.constexpr):
    """The agents as the adaptive average pool (ATen's windows) of the queries' (H, W) grid tokens to a (GA, GB) grid
    (agent a: window row a // GB, column a % GB), in the queries' dtype. float32 window sums as 0/1-weighted dots
    (exact products), rounded to that dtype first with ROUND_SUMS (the reference's mask matmul for unequal windows;
    equal windows take a mean, one rounding), then divided by the window's size. Tokens before PREFIX (a class
    token) are not pooled."""
    top, bottom, left, right = _windows(offs_a, H, W, GA, GB)
    sums = tl.zeros([BLOCK_A, BLOCK_D], dtype=tl.float32)
    for start in range(PREFIX, N, BLOCK_T):
        rows = start + offs_t
        qt = _tile(q_base, rows, N, offs_d, D, sqn, sqd)
        cell = rows - PREFIX
        row, col = (cell // W)[None, :], (cell % W)[None, :]
        member = ((row >= top[:, None]) & (row < bottom[:, None]) & (col >= left[:, None]) & (col < right[:, None])
                  & (rows < N)[None, :])
        sums += tl.dot(member.to(qt.dtype), qt, input_precision=PRECISION)
    dtype = q_base.dtype.element_ty
    if ROUND_SUMS:
        sums = sums.to(dtype).to(tl.float32)
    count = ((bottom - top) * (right - left)).to(tl.float32)
    return (sums / tl.maximum(count, 1.0)[:, None]).to(dtype)


@triton.jit
def pooling_grad_kernel(da_ptr, dq_ptr, H, W, C, GA, GB, sda_b, sda_a, sdq_b, sdq_t, SPAN_H: tl.constexpr,
                        SPAN_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Add the agents' gradient through the adaptive average pool (:func:`_pooled_agents`' windows) into the grid
    queries' gradient, in place (grid: (B * cdiv(H * W, BLOCK_T), cdiv(C, BLOCK_C))).

    dq[b, t, c] += sum over the windows (i, j) holding grid token t = (y, x) of da[b, i * GB + j, c] / size(i, j).
    da (B, GA * GB, C) and dq (B, H * W, C) are read through their batch and row strides (channels contiguous). A
    token lies in at most SPAN_H window rows and SPAN_W window columns (two each where the map is at least the agent
    grid), counted from the first window holding it. Rounding follows autograd through the reference's pooling:
    each window's share rounded to dq's dtype, their sum rounded (the mask matmul's output), the add in float32."""
    tiles = tl.cdiv(H * W, BLOCK_T)
    b = (tl.program_id(0) // tiles).to(tl.int64)
    t = (tl.program_id(0) % tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok, c_ok = t < H * W, c < C
    y, x = t // W, t % W
    dtype = dq_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for di in tl.static_range(SPAN_H):
        i = (y * GA) // H + di
        top, bottom = (i * H) // GA, ((i + 1) * H + GA - 1) // GA
        in_row = (i < GA) & (y >= top) & (y < bottom)
        for dj in tl.static_range(SPAN_W):
            j = (x * GB) // W + dj
            left, right = (j * W) // GB, ((j + 1) * W + GB - 1) // GB
            ok = in_row & (j < GB) & (x >= left) & (x < right) & t_ok
            size = ((bottom - top) * (right - left)).to(tl.float32)
            g = tl.load(da_ptr + b * sda_b + ((i * GB + j) * sda_a)[:, None] + c[None, :],
                        mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            acc += (g / tl.maximum(size, 1.0)[:, None]).to(dtype).to(tl.float32)
    at = dq_ptr + b * sdq_b + (t * sdq_t)[:, None] + c[None, :]
    mask = t_ok[:, None] & c_ok[None, :]
    old = tl.load(at, mask=mask, other=0.0).to(tl.float32)
    tl.store(at, (old + acc.to(dtype).to(tl.float32)).to(dtype), mask=mask)


@triton.jit
def _value_conv_sum(o, v_base, w_ptr, cb_ptr, rows, offs_dv, h, N, svn, svd, sw_c, sw_t, PREFIX, H, W,
                    DV: tl.constexpr, HAS_CB: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """The attention output tile ``o`` (float32) rounded to OUT_DTYPE, plus on grid tokens a 3x3 depthwise conv of
    the values over the token grid (zero padding; channel = head * DV + d), as :mod:`.depthwise_conv`'s kernel
    computes it with a residual: inputs in the weights' (compute) dtype, float32 taps in the same order, the conv
    (+ bias) rounded to the compute dtype, the sum in float32."""
    compute = w_ptr.dtype.element_ty
    residual = o.to(OUT_DTYPE).to(tl.float32)
    cell = rows - PREFIX
    row, col = cell // W, cell % W
    in_grid = (rows >= PREFIX) & (rows < N)
    dv_ok = offs_dv < DV
    ch = h * DV + offs_dv
    acc = tl.zeros(o.shape, dtype=tl.float32)
    for dy in tl.static_range(3):
        y_in = row + (dy - 1)
        y_ok = in_grid & (y_in >= 0) & (y_in < H)
        for dx in tl.static_range(3):
            x_in = col + (dx - 1)
            ok = (y_ok & (x_in >= 0) & (x_in < W))[:, None] & dv_ok[None, :]
            token = PREFIX + y_in * W + x_in
            value = tl.load(v_base + token[:, None] * svn + offs_dv[None, :] * svd, mask=ok, other=0.0)
            tap = tl.load(w_ptr + ch * sw_c + (dy * 3 + dx) * sw_t, mask=dv_ok, other=0.0).to(tl.float32)
            acc += value.to(tl.float32).to(compute).to(tl.float32) * tap[None, :]
    if HAS_CB:
        acc += tl.load(cb_ptr + ch, mask=dv_ok, other=0.0).to(tl.float32)[None, :]
    acc = acc.to(compute).to(tl.float32)
    return tl.where(in_grid[:, None], acc + residual, residual)


@triton.jit
def _pooled_forward_kernel(q_ptr, k_ptr, v_ptr, ab_ptr, qb_ptr, w_ptr, cb_ptr, out_ptr, ag_ptr, av_ptr, lse_ptr,
                           sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                           sbb, sbh, sba, sbm, scb, sch, scn, sca, sw_c, sw_t,
                           HEADS, N, A, PREFIX, H, W, GA, GB, qk_scale2,
                           D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                           BLOCK_A: tl.constexpr, BLOCK_T: tl.constexpr, HAS_AB: tl.constexpr,
                           HAS_QB: tl.constexpr, CONV: tl.constexpr, HAS_CB: tl.constexpr,
                           ROUND_SUMS: tl.constexpr, PRECISION: tl.constexpr, STATS: tl.constexpr):
    """Self-attention of N = PREFIX + H * W tokens through agents pooled from the queries' grid, plus the values'
    depthwise conv on the grid tokens (with CONV): the inference forward of :func:`zoo.ops.pooled_agent_attention`
    in one launch (grid: (batch * heads, query splits)). Keys and values are the same N tokens. With STATS the first
    split also stores what the backward needs: the agents, the agent values and the aggregation's log-sum-exp."""
    qk_scale2 = tl.cast(qk_scale2, tl.float32)
    b, h, offs_a, offs_d = _agent_program(HEADS, BLOCK_A, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_t = tl.arange(0, BLOCK_T)
    a_ok = offs_a < A
    q_base = q_ptr + b * sqb + h * sqh
    v_base = v_ptr + b * svb + h * svh
    agent = _pooled_agents(q_base, offs_a, offs_d, offs_t, N, sqn, sqd, PREFIX, H, W, GA, GB, D, BLOCK_A, BLOCK_D,
                           BLOCK_T, ROUND_SUMS, PRECISION)
    acc, m_i, l_i = _aggregate(agent, k_ptr + b * skb + h * skh, v_base, ab_ptr + b * sbb + h * sbh, offs_a,
                               offs_d, offs_dv, offs_t, N, A, skn, skd, svn, svd, sba, sbm, qk_scale2, D, DV,
                               BLOCK_A, BLOCK_DV, BLOCK_T, HAS_AB, PRECISION)
    agent_v = (acc / l_i[:, None]).to(agent.dtype)
    if STATS and tl.program_id(1) == 0:
        pid64 = tl.program_id(0).to(tl.int64)
        _put(ag_ptr + pid64 * A * D, offs_a, A, offs_d, D, D, 1, agent)
        _put(av_ptr + pid64 * A * DV, offs_a, A, offs_dv, DV, DV, 1, agent_v)
        tl.store(lse_ptr + pid64 * A + offs_a, m_i + tl.log2(l_i), mask=a_ok)
    qb_base = qb_ptr + b * scb + h * sch
    out_base = out_ptr + b * N * HEADS * DV + h * DV
    for start in range(tl.program_id(1) * BLOCK_T, N, BLOCK_T * tl.num_programs(1)):
        rows = start + offs_t
        o = _broadcast(q_base, qb_base, rows, offs_a, offs_d, agent, agent_v, a_ok, N, A, sqn, sqd, scn, sca,
                       qk_scale2, D, HAS_QB, PRECISION)
        if CONV:
            o = _value_conv_sum(o, v_base, w_ptr, cb_ptr, rows, offs_dv, h, N, svn, svd, sw_c, sw_t, PREFIX, H, W,
                                DV, HAS_CB, out_ptr.dtype.element_ty)
        _put(out_base, rows, N, offs_dv, DV, HEADS * DV, 1, o)


@triton.jit
def _broadcast_grads(do_base, q_base, qb_base, out_base, dq_base, dqb_base, agent, agent_v, first, step,
                     offs_a, offs_d, offs_dv, offs_t, a_ok, N, A, HEADS, son, sod, sqn, sqd, scn, sca, sdqn, qb_row,
                     scale, qk_scale2, D: tl.constexpr, DV: tl.constexpr, BLOCK_A: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_QB: tl.constexpr, QB_GRAD: tl.constexpr,
                     PRECISION: tl.constexpr, RECOMPUTE_OUT: tl.constexpr):
    """The broadcast's backward over the query tiles first, first + step, ...: dQ (and the query-bias logit
    gradient, in rows of qb_row agents) written per tile; returns the float32 sums into d(agent) (BLOCK_A, BLOCK_D)
    and d(agent_v) (BLOCK_A, BLOCK_DV) over those tiles."""
    LOG2E: tl.constexpr = 1.4426950408889634
    d_agent = tl.zeros([BLOCK_A, BLOCK_D], dtype=tl.float32)
    d_agent_v = tl.zeros([BLOCK_A, BLOCK_DV], dtype=tl.float32)
    for start in range(first, N, step):
        rows = start + offs_t
        r_ok = rows < N
        qt = _tile(q_base, rows, N, offs_d, D, sqn, sqd)
        dot_ = _tile(do_base, rows, N, offs_dv, DV, son, sod)
        s = tl.dot(qt, tl.trans(agent), input_precision=PRECISION) * qk_scale2
        if HAS_QB:
            s += _tile(qb_base, rows, N, offs_a, A, scn, sca).to(tl.float32) * LOG2E
        s = tl.where(a_ok[None, :], s, float("-inf"))
        p = tl.exp2(s - tl.max(s, axis=1)[:, None])  # the forward's softmax over all agents, recomputed
        l = tl.sum(p, axis=1)
        if RECOMPUTE_OUT:  # the output tile as the forward computed and rounded it (its stored one holds more terms)
            ot = (tl.dot(p.to(agent_v.dtype), agent_v, input_precision=PRECISION) / l[:, None]).to(agent_v.dtype)
        else:
            ot = _tile(out_base, rows, N, offs_dv, DV, HEADS * DV, 1)
        p = tl.where(r_ok[:, None], p / l[:, None], 0.0)
        delta = tl.sum(dot_.to(tl.float32) * ot.to(tl.float32), axis=1)
        dp = tl.dot(dot_, tl.trans(agent_v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])  # gradient of the (natural) logits
        dq = tl.dot(ds.to(agent.dtype), agent, input_precision=PRECISION) * scale
        _put(dq_base, rows, N, offs_d, D, sdqn, 1, dq)
        d_agent += tl.dot(tl.trans(ds.to(qt.dtype)), qt, input_precision=PRECISION)
        d_agent_v += tl.dot(tl.trans(p.to(dot_.dtype)), dot_, input_precision=PRECISION)
        if QB_GRAD:
            _put(dqb_base, rows, N, offs_a, qb_row, qb_row, 1, ds)  # padded rows: 16-byte stores (module note)
    return d_agent, d_agent_v


@triton.jit
def _aggregation_grads(k_base, v_base, ab_base, dk_base, dv_base, dab_base, agent, agent_v, d_agent_v, lse, first,
                       step, offs_a, offs_d, offs_dv, offs_t, a_ok, M, A, HEADS, skn, skd, svn, svd, sba, sbm,
                       sdkn, sdvn, ab_row, scale, qk_scale2, D: tl.constexpr, DV: tl.constexpr, BLOCK_A: tl.constexpr,
                       BLOCK_D: tl.constexpr, HAS_AB: tl.constexpr, AB_GRAD: tl.constexpr, PRECISION: tl.constexpr):
    """The aggregation's backward over the key tiles first, first + step, ... given the whole float32 d(agent_v):
    dK, dV (and the agent-bias logit gradient, in rows of ab_row keys) written per tile; returns the float32 sum
    into d(agent) (BLOCK_A, BLOCK_D) over those tiles."""
    LOG2E: tl.constexpr = 1.4426950408889634
    delta1 = tl.sum(d_agent_v * agent_v.to(tl.float32), axis=1)
    dav = d_agent_v.to(agent_v.dtype)
    d_agent = tl.zeros([BLOCK_A, BLOCK_D], dtype=tl.float32)
    for start in range(first, M, step):
        keys = start + offs_t
        k_ok = keys < M
        kt = _tile(k_base, keys, M, offs_d, D, skn, skd)
        vt = _tile(v_base, keys, M, offs_dv, DV, svn, svd)
        s = tl.dot(agent, tl.trans(kt), input_precision=PRECISION) * qk_scale2
        if HAS_AB:
            s += _tile(ab_base, offs_a, A, keys, M, sba, sbm).to(tl.float32) * LOG2E
        p = tl.where(a_ok[:, None] & k_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(dav, tl.trans(vt), input_precision=PRECISION)
        ds = p * (dp - delta1[:, None])
        dv = tl.dot(tl.trans(p.to(dav.dtype)), dav, input_precision=PRECISION)
        _put(dv_base, keys, M, offs_dv, DV, sdvn, 1, dv)
        dk = tl.dot(tl.trans(ds.to(agent.dtype)), agent, input_precision=PRECISION) * scale
        _put(dk_base, keys, M, offs_d, D, sdkn, 1, dk)
        d_agent += tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)
        if AB_GRAD:
            _put(dab_base, offs_a, A, keys, ab_row, ab_row, 1, ds)
    return d_agent


@triton.jit
def _pair_grads(do_base, q_base, k_base, v_base, a_base, ab_base, qb_base, out_base, av_ptr, lse_ptr, dq_base,
                dk_base, dv_base, dab_ptr, dqb_ptr, pid64, offs_a, offs_d, offs_dv, offs_t, a_ok, N, M, A, HEADS,
                son, sod, sqn, sqd, skn, skd, svn, svd, san, sad, sba, sbm, scn, sca, sdqn, sdkn, sdvn, ab_row,
                qb_row, scale, qk_scale2, D: tl.constexpr, DV: tl.constexpr, BLOCK_A: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr, HAS_AB: tl.constexpr,
                HAS_QB: tl.constexpr, AB_GRAD: tl.constexpr, QB_GRAD: tl.constexpr, PRECISION: tl.constexpr,
                RECOMPUTE_OUT: tl.constexpr):
    """The agent attention's backward of one (batch, head) (the ``*_base`` pointers at its rows): the query tiles
    (dQ), then the key tiles (dK, dV); returns the float32 (BLOCK_A, BLOCK_D) d(agent), unscaled."""
    agent = _tile(a_base, offs_a, A, offs_d, D, san, sad)
    agent_v = _tile(av_ptr + pid64 * A * DV, offs_a, A, offs_dv, DV, DV, 1)
    lse = tl.load(lse_ptr + pid64 * A + offs_a, mask=a_ok, other=0.0)
    d_agent, d_agent_v = _broadcast_grads(
        do_base, q_base, qb_base, out_base, dq_base, dqb_ptr + pid64 * N * qb_row, agent, agent_v, 0, BLOCK_T,
        offs_a, offs_d, offs_dv, offs_t, a_ok, N, A, HEADS, son, sod, sqn, sqd, scn, sca, sdqn, qb_row, scale,
        qk_scale2, D, DV, BLOCK_A, BLOCK_D, BLOCK_DV, HAS_QB, QB_GRAD, PRECISION, RECOMPUTE_OUT)
    d_agent += _aggregation_grads(
        k_base, v_base, ab_base, dk_base, dv_base, dab_ptr + pid64 * A * ab_row, agent, agent_v, d_agent_v, lse, 0,
        BLOCK_T, offs_a, offs_d, offs_dv, offs_t, a_ok, M, A, HEADS, skn, skd, svn, svd, sba, sbm, sdkn, sdvn,
        ab_row, scale, qk_scale2, D, DV, BLOCK_A, BLOCK_D, HAS_AB, AB_GRAD, PRECISION)
    return d_agent


@triton.jit
def _backward_kernel(do_ptr, q_ptr, k_ptr, v_ptr, a_ptr, ab_ptr, qb_ptr, out_ptr, av_ptr, lse_ptr,
                     dq_ptr, dk_ptr, dv_ptr, da_ptr, dab_ptr, dqb_ptr,
                     sob, soh, son, sod, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     sab, sah, san, sad, sbb, sbh, sba, sbm, scb, sch, scn, sca,
                     sdqb, sdqn, sdkb, sdkn, sdvb, sdvn, ab_row, qb_row, HEADS, N, M, A, scale, qk_scale2,
                     D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     BLOCK_A: tl.constexpr, BLOCK_T: tl.constexpr, HAS_AB: tl.constexpr,
                     HAS_QB: tl.constexpr, AB_GRAD: tl.constexpr, QB_GRAD: tl.constexpr,
                     PRECISION: tl.constexpr, RECOMPUTE_OUT: tl.constexpr = False):
    """The whole backward of one (batch, head) (grid: batch * heads): the query tiles, then the key tiles."""
    scale, qk_scale2 = tl.cast(scale, tl.float32), tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    b, h, pid64, offs_a, offs_d, offs_dv, offs_t, a_ok = _backward_program(HEADS, A, BLOCK_A, BLOCK_D, BLOCK_DV,
                                                                           BLOCK_T)
    d_agent = _pair_grads(
        do_ptr + b * sob + h * soh, q_ptr + b * sqb + h * sqh, k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh,
        a_ptr + b * sab + h * sah, ab_ptr + b * sbb + h * sbh, qb_ptr + b * scb + h * sch,
        out_ptr + b * N * HEADS * DV + h * DV, av_ptr, lse_ptr, dq_ptr + b * sdqb + h * D,
        dk_ptr + b * sdkb + h * D, dv_ptr + b * sdvb + h * DV, dab_ptr, dqb_ptr, pid64, offs_a, offs_d, offs_dv,
        offs_t, a_ok, N, M, A, HEADS, son, sod, sqn, sqd, skn, skd, svn, svd, san, sad, sba, sbm, scn, sca, sdqn,
        sdkn, sdvn, ab_row, qb_row, scale, qk_scale2, D, DV, BLOCK_A, BLOCK_D, BLOCK_DV, BLOCK_T, HAS_AB, HAS_QB,
        AB_GRAD, QB_GRAD, PRECISION, RECOMPUTE_OUT)
    _put(da_ptr + b * A * HEADS * D + h * D, offs_a, A, offs_d, D, HEADS * D, 1, d_agent * scale)


@triton.jit
def _add_pooling_grads(dq_base, d_agent, offs_a, offs_d, offs_t, a_ok, N, sdqn, PREFIX, H, W, GA, GB,
                       D: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    """Add the agents' gradient ``d_agent`` (float32 (BLOCK_A, BLOCK_D), scaled) through :func:`_pooled_agents`'
    pooling into the grid queries' rows of dq (one head's, channels contiguous), which this program wrote before a
    barrier. Rounding as :func:`pooling_grad_kernel` (autograd through the reference's pooling): the agents' gradient
    rounded to dq's dtype, each window's share rounded, their sum (0/1 membership dots of exact products) rounded,
    the add in float32."""
    dtype = dq_base.dtype.element_ty
    top, bottom, left, right = _windows(offs_a, H, W, GA, GB)
    size = tl.maximum(((bottom - top) * (right - left)).to(tl.float32), 1.0)
    share = tl.where(a_ok[:, None], d_agent.to(dtype).to(tl.float32) / size[:, None], 0.0).to(dtype)
    for start in range(PREFIX, N, BLOCK_T):
        rows = start + offs_t
        cell = rows - PREFIX
        row, col = (cell // W)[:, None], (cell % W)[:, None]
        member = ((row >= top[None, :]) & (row < bottom[None, :]) & (col >= left[None, :]) & (col < right[None, :])
                  & (rows < N)[:, None])
        add = tl.dot(member.to(dtype), share, input_precision=PRECISION)
        old = _tile(dq_base, rows, N, offs_d, D, sdqn, 1).to(tl.float32)
        _put(dq_base, rows, N, offs_d, D, sdqn, 1, old + add.to(dtype).to(tl.float32))


@triton.jit
def _shifted_grad(do_base, y, x, in_grid, dv_ok, offs_dv, son, sod, PREFIX, H, W, I: tl.constexpr,
                  J: tl.constexpr, compute: tl.constexpr):
    """The output gradient at grid cells (y - 1 + I, x - 1 + J) (zero outside the grid), (tokens, BLOCK_DV) float32
    rounded to ``compute``."""
    yy, xx = y + (I - 1), x + (J - 1)
    ok = (in_grid & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W))[:, None] & dv_ok[None, :]
    g = tl.load(do_base + (PREFIX + yy * W + xx)[:, None] * son + offs_dv[None, :] * sod, mask=ok, other=0.0)
    return g.to(compute).to(tl.float32)


@triton.jit
def _conv_inputs(do_base, v_base, start, offs_t, dv_ok, offs_dv, N, son, sod, svn, svd, PREFIX, H, W,
                 DV: tl.constexpr, compute: tl.constexpr, WEIGHT_GRAD: tl.constexpr):
    """What :func:`_conv_grads` reads for the grid tokens start, start + 1, ...: the output gradient at their nine
    neighbours (:func:`_shifted_grad`) and, with WEIGHT_GRAD, the values (else zeros), rounded to ``compute``."""
    rows = start + offs_t
    cell = rows - PREFIX
    y, x = cell // W, cell % W
    in_grid = rows < N
    # g<i><j>: the output gradient at (y - 1 + i, x - 1 + j), which meets tap 8 - (3i + j)
    g00 = _shifted_grad(do_base, y, x, in_grid, dv_ok, offs_dv, son, sod, PREFIX, H, W, 0, 0, compute)
    g01 = _shifted_grad(do_base, y, x, in_grid, dv_ok, offs_dv, son, sod, PREFIX, H, W, 0, 1, compute)
    g02 = _shifted_grad(do_base, y, x, in_grid, dv_ok, offs_dv, son, sod, PREFIX, H, W, 0, 2, compute)
    g10 = _shifted_grad(do_base, y, x, in_grid, dv_ok, offs_dv, son, sod, PREFIX, H, W, 1, 0, compute)
    g11 = _shifted_grad(do_base, y, x, in_grid, dv_ok, offs_dv, son, sod, PREFIX, H, W, 1, 1, compute)
    g12 = _shifted_grad(do_base, y, x, in_grid, dv_ok, offs_dv, son, sod, PREFIX, H, W, 1, 2, compute)
    g20 = _shifted_grad(do_base, y, x, in_grid, dv_ok, offs_dv, son, sod, PREFIX, H, W, 2, 0, compute)
    g21 = _shifted_grad(do_base, y, x, in_grid, dv_ok, offs_dv, son, sod, PREFIX, H, W, 2, 1, compute)
    g22 = _shifted_grad(do_base, y, x, in_grid, dv_ok, offs_dv, son, sod, PREFIX, H, W, 2, 2, compute)
    if WEIGHT_GRAD:
        xt = _tile(v_base, rows, N, offs_dv, DV, svn, svd).to(compute).to(tl.float32)
    else:
        xt = tl.zeros_like(g11)
    return g00, g01, g02, g10, g11, g12, g20, g21, g22, xt


@triton.jit
def _conv_grads(do_base, v_base, dv_base, w_ptr, part_base, h, offs_dv, N, son, sod, svn, svd, sdvn, sw_c, sw_t, C,
                PREFIX, H, W, DV: tl.constexpr, BLOCK_DV: tl.constexpr, CONV_T: tl.constexpr,
                WEIGHT_GRAD: tl.constexpr):
    """The backward of the values' 3x3 depthwise conv (:func:`_value_conv_sum`) on this program's (batch, head)
    channels (head * DV + d), over tiles of CONV_T grid tokens: its input gradient added into dv's grid rows (which
    this program wrote before a barrier), and with WEIGHT_GRAD the float32 sums over the program's grid tokens of the
    weight's nine taps' and the bias's gradients, stored as rows 0-8 and 9 of part_base's (10, C). Numerics of the
    depthwise-conv op's ``backward3_kernel``: the output gradient and the values rounded to the weights' (compute)
    dtype, float32 taps in its order, the input gradient rounded to the compute dtype and added in float32.

    The ten sums stay per token and channel until the end: summing each tile over its tokens (a reduction across
    warps, ten a tile) made Agent-DeiT-T's whole backward kernel 123.5 us instead of 77.5 (H200, bf16, batch 64;
    16-token tiles; 32-token ones 92.9). Loading each tile's inputs during the tile before (:func:`_conv_inputs`)
    took the whole kernel from 155.3-156.4 to 153.1-154.0 us at Agent-DeiT-S's blocks and from 80.3-80.4 to 79.3-79.6
    at Agent-DeiT-T's (the same bits under the interpreter; ptxas: 255 registers, 40 bytes spilled)."""
    compute = w_ptr.dtype.element_ty
    offs_t = tl.arange(0, CONV_T)
    dv_ok = offs_dv < DV
    ch = h * DV + offs_dv
    w00, w01, w02, w10, w11, w12, w20, w21, w22 = reversed_taps(w_ptr, ch, dv_ok, sw_c, sw_t)
    s0 = tl.zeros([CONV_T, BLOCK_DV], dtype=tl.float32)  # s<t>: tap t's weight-gradient products, sb the bias's
    s1 = s0
    s2 = s0
    s3 = s0
    s4 = s0
    s5 = s0
    s6 = s0
    s7 = s0
    s8 = s0
    sb = s0
    g00, g01, g02, g10, g11, g12, g20, g21, g22, xt = _conv_inputs(
        do_base, v_base, PREFIX, offs_t, dv_ok, offs_dv, N, son, sod, svn, svd, PREFIX, H, W, DV, compute, WEIGHT_GRAD)
    for start in range(PREFIX, N, CONV_T):
        rows = start + offs_t
        dx = input_grad_row(g00, g01, g02, g10, g11, g12, g20, g21, g22, w00, w01, w02, w10, w11, w12, w20, w21,
                            w22, compute)
        if WEIGHT_GRAD:
            s8 += g00 * xt
            s7 += g01 * xt
            s6 += g02 * xt
            s5 += g10 * xt
            s4 += g11 * xt
            s3 += g12 * xt
            s2 += g20 * xt
            s1 += g21 * xt
            s0 += g22 * xt
            sb += g11
        old = _tile(dv_base, rows, N, offs_dv, DV, sdvn, 1).to(tl.float32)
        # the next tile's loads (past N: masked, zeros) issued before this tile's store, which the compiler cannot
        # move them past (the pointers may alias): they wait on memory while the store does
        g00, g01, g02, g10, g11, g12, g20, g21, g22, xt = _conv_inputs(
            do_base, v_base, start + CONV_T, offs_t, dv_ok, offs_dv, N, son, sod, svn, svd, PREFIX, H, W, DV, compute,
            WEIGHT_GRAD)
        _put(dv_base, rows, N, offs_dv, DV, sdvn, 1, old + dx)
    if WEIGHT_GRAD:
        store_tap_sums(part_base + ch, C, dv_ok, s0, s1, s2, s3, s4, s5, s6, s7, s8, sb)


@triton.jit
def _pooled_backward_kernel(do_ptr, q_ptr, k_ptr, v_ptr, a_ptr, ab_ptr, qb_ptr, av_ptr, lse_ptr, w_ptr,
                            dq_ptr, dk_ptr, dv_ptr, dab_ptr, dqb_ptr, part_ptr,
                            sob, soh, son, sod, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                            sab, sah, san, sad, sbb, sbh, sba, sbm, scb, sch, scn, sca, sw_c, sw_t,
                            sdqb, sdqn, sdkb, sdkn, sdvb, sdvn, ab_row, qb_row, HEADS, N, A, PREFIX, H, W, GA, GB,
                            scale, qk_scale2,
                            D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                            BLOCK_A: tl.constexpr, BLOCK_T: tl.constexpr, HAS_AB: tl.constexpr,
                            HAS_QB: tl.constexpr, AB_GRAD: tl.constexpr, QB_GRAD: tl.constexpr,
                            CONV: tl.constexpr, WEIGHT_GRAD: tl.constexpr, PRECISION: tl.constexpr,
                            CONV_T: tl.constexpr):
    """The whole backward of :func:`_pooled_forward_kernel` for one (batch, head) (grid: batch * heads): the agent
    attention's (:func:`_backward_kernel`, the output tiles recomputed), then, once its dQ and dV rows are written,
    the pooling's gradient added into dQ's grid rows and with CONV the conv's input gradient into dV's, and with
    WEIGHT_GRAD the conv's weight and bias partial sums, (B, 10, HEADS * DV) float32 at part_ptr. The agents
    (a_ptr) are the forward's, stored with its statistics."""
    scale, qk_scale2 = tl.cast(scale, tl.float32), tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    b, h, pid64, offs_a, offs_d, offs_dv, offs_t, a_ok = _backward_program(HEADS, A, BLOCK_A, BLOCK_D, BLOCK_DV,
                                                                           BLOCK_T)
    do_base = do_ptr + b * sob + h * soh
    v_base = v_ptr + b * svb + h * svh
    dq_base = dq_ptr + b * sdqb + h * D
    dv_base = dv_ptr + b * sdvb + h * DV
    d_agent = _pair_grads(
        do_base, q_ptr + b * sqb + h * sqh, k_ptr + b * skb + h * skh, v_base, a_ptr + b * sab + h * sah,
        ab_ptr + b * sbb + h * sbh, qb_ptr + b * scb + h * sch, q_ptr, av_ptr, lse_ptr, dq_base,
        dk_ptr + b * sdkb + h * D, dv_base, dab_ptr, dqb_ptr, pid64, offs_a, offs_d, offs_dv, offs_t, a_ok, N, N, A,
        HEADS, son, sod, sqn, sqd, skn, skd, svn, svd, san, sad, sba, sbm, scn, sca, sdqn, sdkn, sdvn, ab_row,
        qb_row, scale, qk_scale2, D, DV, BLOCK_A, BLOCK_D, BLOCK_DV, BLOCK_T, HAS_AB, HAS_QB, AB_GRAD, QB_GRAD,
        PRECISION, True)
    tl.debug_barrier()  # this program's dQ and dV stores, visible to all its threads before they are read back
    _add_pooling_grads(dq_base, d_agent * scale, offs_a, offs_d, offs_t, a_ok, N, sdqn, PREFIX, H, W, GA, GB, D,
                       BLOCK_T, PRECISION)
    if CONV:
        _conv_grads(do_base, v_base, dv_base, w_ptr, part_ptr + b * 10 * HEADS * DV, h, offs_dv, N, son, sod, svn,
                    svd, sdvn, sw_c, sw_t, HEADS * DV, PREFIX, H, W, DV, BLOCK_DV, CONV_T, WEIGHT_GRAD)


# Where batch * heads leaves SMs idle (Agent-PVT-T stage 0: one head) the backward runs as two launches over a
# (batch * heads, splits) grid: the query tiles dealt to the splits, each writing float32 partial sums of d(agent)
# and d(agent_v); then the key tiles, each program first summing the d(agent_v) partials in split order. torch sums
# the d(agent) partials in a fixed order too: no atomics, the same bits every call.


@triton.jit
def _backward_queries_kernel(do_ptr, q_ptr, a_ptr, qb_ptr, out_ptr, av_ptr, dq_ptr, dqb_ptr, pa_ptr, pv_ptr,
                             sob, soh, son, sod, sqb, sqh, sqn, sqd, sab, sah, san, sad, scb, sch, scn, sca,
                             sdqb, sdqn, qb_row, HEADS, N, A, scale, qk_scale2,
                             D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                             BLOCK_A: tl.constexpr, BLOCK_T: tl.constexpr, HAS_QB: tl.constexpr,
                             QB_GRAD: tl.constexpr, PRECISION: tl.constexpr, RECOMPUTE_OUT: tl.constexpr = False):
    """Split backward, part 1 (grid: (batch * heads, splits)): split s takes query tiles s, s + splits, ...; writes
    dQ and its float32 partials of d(agent) into pa (splits, batch * heads, A, D) and of d(agent_v) into pv."""
    scale, qk_scale2 = tl.cast(scale, tl.float32), tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    b, h, pid64, offs_a, offs_d, offs_dv, offs_t, a_ok = _backward_program(HEADS, A, BLOCK_A, BLOCK_D, BLOCK_DV,
                                                                           BLOCK_T)
    agent = _tile(a_ptr + b * sab + h * sah, offs_a, A, offs_d, D, san, sad)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    agent_v = _tile(av_ptr + pid64 * A * DV, offs_a, A, offs_dv, DV, DV, 1)
    d_agent, d_agent_v = _broadcast_grads(
        do_ptr + b * sob + h * soh, q_ptr + b * sqb + h * sqh, qb_ptr + b * scb + h * sch,
        out_ptr + b * N * HEADS * DV + h * DV, dq_ptr + b * sdqb + h * D, dqb_ptr + pid64 * N * qb_row,
        agent, agent_v, split * BLOCK_T, splits * BLOCK_T, offs_a, offs_d, offs_dv, offs_t, a_ok, N, A, HEADS,
        son, sod, sqn, sqd, scn, sca, sdqn, qb_row, scale, qk_scale2, D, DV, BLOCK_A, BLOCK_D, BLOCK_DV, HAS_QB,
        QB_GRAD, PRECISION, RECOMPUTE_OUT)
    part = split.to(tl.int64) * tl.num_programs(0) + pid64
    _put(pa_ptr + part * A * D, offs_a, A, offs_d, D, D, 1, d_agent)
    _put(pv_ptr + part * A * DV, offs_a, A, offs_dv, DV, DV, 1, d_agent_v)


@triton.jit
def _backward_keys_kernel(k_ptr, v_ptr, a_ptr, ab_ptr, av_ptr, lse_ptr, pv_ptr, dk_ptr, dv_ptr, dab_ptr, pk_ptr,
                          skb, skh, skn, skd, svb, svh, svn, svd, sab, sah, san, sad, sbb, sbh, sba, sbm,
                          sdkb, sdkn, sdvb, sdvn, ab_row, HEADS, M, A, QUERY_SPLITS, scale, qk_scale2,
                          D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                          BLOCK_A: tl.constexpr, BLOCK_T: tl.constexpr, HAS_AB: tl.constexpr,
                          AB_GRAD: tl.constexpr, PRECISION: tl.constexpr):
    """Split backward, part 2 (grid: (batch * heads, splits)): d(agent_v) summed from part 1's QUERY_SPLITS
    partials in split order, then split s takes key tiles s, s + splits, ...; writes dK, dV and its float32 partial
    of d(agent) into pk (splits, batch * heads, A, D)."""
    scale, qk_scale2 = tl.cast(scale, tl.float32), tl.cast(qk_scale2, tl.float32)  # fp64 from inductor's launcher
    b, h, pid64, offs_a, offs_d, offs_dv, offs_t, a_ok = _backward_program(HEADS, A, BLOCK_A, BLOCK_D, BLOCK_DV,
                                                                           BLOCK_T)
    agent = _tile(a_ptr + b * sab + h * sah, offs_a, A, offs_d, D, san, sad)
    pairs = tl.num_programs(0)
    split = tl.program_id(1)
    agent_v = _tile(av_ptr + pid64 * A * DV, offs_a, A, offs_dv, DV, DV, 1)
    lse = tl.load(lse_ptr + pid64 * A + offs_a, mask=a_ok, other=0.0)
    d_agent_v = tl.zeros([BLOCK_A, BLOCK_DV], dtype=tl.float32)
    for part in range(QUERY_SPLITS):
        d_agent_v += _tile(pv_ptr + (part * pairs + pid64) * A * DV, offs_a, A, offs_dv, DV, DV, 1)
    d_agent = _aggregation_grads(
        k_ptr + b * skb + h * skh, v_ptr + b * svb + h * svh, ab_ptr + b * sbb + h * sbh,
        dk_ptr + b * sdkb + h * D, dv_ptr + b * sdvb + h * DV, dab_ptr + pid64 * A * ab_row,
        agent, agent_v, d_agent_v, lse, split * BLOCK_T, tl.num_programs(1) * BLOCK_T, offs_a, offs_d, offs_dv,
        offs_t, a_ok, M, A, HEADS, skn, skd, svn, svd, sba, sbm, sdkn, sdvn, ab_row, scale, qk_scale2, D, DV,
        BLOCK_A, BLOCK_D, HAS_AB, AB_GRAD, PRECISION)
    _put(pk_ptr + (split.to(tl.int64) * pairs + pid64) * A * D, offs_a, A, offs_d, D, D, 1, d_agent)


@triton.jit
def _agent_grad_sum_kernel(pa_ptr, pk_ptr, da_ptr, sdab, sdah, sdaa, sdad, HEADS, A, SPLITS, scale,
                           D: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr):
    """Split backward, part 3 (grid: (batch * heads,)): d(agent) from parts 1 and 2's float32 partials pa and pk
    (SPLITS, batch * heads, A, D): each summed over the splits in split order, the queries' sum plus the keys',
    times ``scale``, rounded once to da's dtype; da (batch, heads, A, D) through its strides."""
    scale = tl.cast(scale, tl.float32)  # fp64 from inductor's launcher
    b, h, offs_a, offs_d = _agent_program(HEADS, BLOCK_A, BLOCK_D)
    pairs = tl.num_programs(0)
    pid64 = tl.program_id(0).to(tl.int64)
    from_queries = tl.zeros([BLOCK_A, BLOCK_D], dtype=tl.float32)
    from_keys = tl.zeros([BLOCK_A, BLOCK_D], dtype=tl.float32)
    for part in range(SPLITS):
        base = (part * pairs + pid64) * A * D
        from_queries += _tile(pa_ptr + base, offs_a, A, offs_d, D, D, 1)
        from_keys += _tile(pk_ptr + base, offs_a, A, offs_d, D, D, 1)
    _put(da_ptr + b * sdab + h * sdah, offs_a, A, offs_d, D, sdaa, sdad, (from_queries + from_keys) * scale)


@triton.jit
def bias_grad_sum_kernel(src_ptr, dst_ptr, B, ROWS, W, src_batch, src_row, BATCHES_PER_SPLIT,
                         BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """A batch-broadcast bias's gradient (grid: (cdiv(ROWS, BLOCK_R), cdiv(W, BLOCK_W), splits)): program (i, j, s)
    sums batches [s * BATCHES_PER_SPLIT, (s + 1) * BATCHES_PER_SPLIT) of the float32 (B, ROWS, padded row) buffer, in
    batch order, the first W of each row, into dst's split s: (splits, ROWS, W) contiguous, rounded once to dst's
    dtype. One split gives the bias's gradient; more give float32 partial sums, which a second launch with one split
    (B = splits) adds up in split order."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    split = tl.program_id(2)
    first = split * BATCHES_PER_SPLIT
    end = tl.minimum(first + BATCHES_PER_SPLIT, B)
    total = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    src = src_ptr + first.to(tl.int64) * src_batch
    for _ in tl.range(first, end, num_stages=3):  # the next batches' loads issued while this one is added
        total += _tile(src, rows, ROWS, cols, W, src_row, 1)
        src += src_batch
    _put(dst_ptr + split.to(tl.int64) * ROWS * W, rows, ROWS, cols, W, W, 1, total)
