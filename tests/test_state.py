"""SteeringState bookkeeping without an engine: slots, rows, moves, token mapping."""

import pytest
import torch

from roast_vllm import SteeringVector
from roast_vllm.engine.spec import SteerSpec
from roast_vllm.engine.state import SteeringState, SteeringVectorError

L, H = 4, 8


@pytest.fixture
def st():
    s = SteeringState(L, H, max_slots=2, max_num_seqs=4, max_num_tokens=32, dtype=torch.float32)
    s.register_vector("a", SteeringVector(directions={1: torch.ones(H), 2: 2 * torch.ones(H)}))
    s.register_vector("b", SteeringVector(directions={l: -torch.ones(H) for l in range(L)}))
    return s


def test_slot_table_rows(st):
    i = st.acquire(SteerSpec("a", scale=3.0, layers=(2,)))
    assert i >= 1
    assert torch.equal(st.table[2, i], torch.full((H,), 2.0)) and st.slot_scale[i] == 3.0
    assert torch.count_nonzero(st.table[1, i]) == 0  # layer 1 not selected
    assert torch.count_nonzero(st.table[:, 0]) == 0  # slot 0 is "no steering"
    j = st.acquire(SteerSpec("a", scale=3.0, layers=(2,)))
    assert j == i and st.active_slots() == 1  # shared config, shared slot
    st.release(i)
    st.release(j)
    assert st.active_slots() == 0


def test_per_layer_scale_is_folded_into_the_slot_rows(st):
    """A per-layer ``steer_scale`` (3 thirds or one per layer) multiplies each layer's row
    of the slot, whose scale is then 1: ``table * scale`` is the same fp32 product the
    scalar path forms. Other scales are other slots; a bad length is refused."""
    per = st.acquire(SteerSpec("b", scale=(0.5, -2.0, 0.0, 3.0)))
    assert st.slot_scale[per] == 1.0
    for l, s in enumerate((0.5, -2.0, 0.0, 3.0)):
        assert torch.equal(st.table[l, per], torch.full((H,), -s))
    thirds = st.acquire(SteerSpec("a", scale=(1.5, 4.0, -1.0)))  # 4 layers: 0-1 | 2 | 3
    assert thirds != per
    want = {1: 1.5 * 1.0, 2: 4.0 * 2.0}  # "a" has layers 1 (ones) and 2 (twos)
    for l in range(L):
        assert torch.equal(st.table[l, thirds], torch.full((H,), want.get(l, 0.0)))
    with pytest.raises(SteeringVectorError, match="5 entries"):
        st.acquire(SteerSpec("a", scale=(1.0,) * 5))


def test_slot_exhaustion_is_loud(st):
    st.acquire(SteerSpec("a", 1.0))
    st.acquire(SteerSpec("a", 2.0))
    with pytest.raises(RuntimeError, match="slots are in use"):
        st.acquire(SteerSpec("a", 3.0))


def test_replaced_vector_keeps_running_slot(st):
    i = st.acquire(SteerSpec("a", 1.0))
    before = st.table[:, i].clone()
    st.register_vector("a", SteeringVector(directions={1: 5 * torch.ones(H)}))
    assert torch.equal(st.table[:, i], before)  # running request unaffected
    k = st.acquire(SteerSpec("a", 1.0))
    assert k != i and torch.equal(st.table[1, k], 5 * torch.ones(H))
    assert torch.equal(st.table[:, i], before)


def test_rows_moves_and_token_slots(st):
    st.set_row(0, SteerSpec("a", 1.0, positions="generated"), prompt_len=3)
    st.set_row(1, None, prompt_len=2)
    st.set_row(2, SteerSpec("b", 1.0, positions="prompt"), prompt_len=2)
    st.sync_rows()
    # step: row0 decodes 1 token at pos 3; row1 prefills 2; row2 prefills 2 (+ 1 padded
    # graph token): the runner's per-token row index and positions, no attention metadata
    req_indices = torch.tensor([0, 1, 1, 2, 2, 3, 3])  # entries past n are stale
    positions = torch.tensor([3, 0, 1, 0, 1, 0])
    st.token_slot.fill_(7)  # stale values from an earlier, larger step
    st.prepare_step(req_indices, positions, num_tokens=5)
    sa, sb = st.row_slot_cpu[0].item(), st.row_slot_cpu[2].item()
    assert st.token_slot[:6].tolist() == [sa, 0, 0, sb, sb, 0]
    assert torch.count_nonzero(st.token_slot[5:]) == 0  # padding and tail: slot 0
    assert st.step_steered
    # swap rows 0 and 2, then a one-way move 2 -> 1 (row 1's occupant is replaced)
    st.move_row(0, 2, swap=True)
    st.move_row(2, 1, swap=False)
    st.sync_rows()
    assert st.row_slot_cpu.tolist()[:3] == [sb, sa, 0]
    assert st.num_steered_rows == 2
    st.clear_row(0)
    st.clear_row(1)
    assert st.num_steered_rows == 0 and st.active_slots() == 0
    st.prepare_step(req_indices, positions, num_tokens=5)
    assert torch.count_nonzero(st.token_slot) == 0 and not st.step_steered


def test_apply_leaves_slot_zero_rows_bit_identical(st):
    st.set_row(0, SteerSpec("b", 2.0), prompt_len=1)
    st.sync_rows()
    st.prepare_step(torch.tensor([1, 0, 1]), torch.tensor([0, 5, 1]), num_tokens=3)
    assert st.token_slot[:3].tolist() == [0, st.row_slot_cpu[0].item(), 0]
    h = torch.randn(3, H).to(torch.bfloat16)
    orig = h.clone()
    out = st.apply(3, h)
    assert out is h
    assert torch.equal(h[0].view(torch.int16), orig[0].view(torch.int16))
    assert torch.equal(h[2].view(torch.int16), orig[2].view(torch.int16))
    assert torch.equal(h[1], (orig[1].float() - 2.0).to(torch.bfloat16))


def test_register_checks_model_fit(st):
    from roast_vllm import SteeringVectorError

    with pytest.raises(SteeringVectorError, match="size 3"):
        st.register_vector("x", SteeringVector(directions={0: torch.ones(3)}))
    with pytest.raises(SteeringVectorError, match="4 layers"):
        st.register_vector("x", SteeringVector(directions={9: torch.ones(H)}))


I = 12  # MLP width of the toy model


@pytest.fixture
def st_mlp():
    s = SteeringState(L, H, max_slots=3, max_num_seqs=4, max_num_tokens=32, dtype=torch.float32, mlp_size=I)
    s.register_vector("r", SteeringVector(directions={1: torch.ones(H)}))
    s.register_vector(
        "m", SteeringVector(directions={1: torch.arange(I, dtype=torch.float32)}, site="mlp_act")
    )
    return s


def test_mlp_act_slot_fills_its_own_table(st_mlp):
    i = st_mlp.acquire(SteerSpec("m", 2.0))
    j = st_mlp.acquire(SteerSpec("r", 1.0))
    assert torch.equal(st_mlp.mlp_table[1, i], torch.arange(I, dtype=torch.float32))
    assert torch.count_nonzero(st_mlp.table[:, i]) == 0  # residual row of an mlp slot: zero
    assert torch.count_nonzero(st_mlp.mlp_table[:, j]) == 0
    # (SiLU(g) + s * v) * up == SiluAndMul(g, up) + s * v * up
    st_mlp.set_row(0, SteerSpec("m", 2.0), prompt_len=1)
    st_mlp.set_row(1, None, prompt_len=1)
    st_mlp.sync_rows()
    st_mlp.prepare_step(torch.tensor([0, 1]), torch.tensor([3, 3]), num_tokens=2)
    assert st_mlp.mlp_token_slot[:2].tolist() == [i, 0]
    assert st_mlp.token_slot[:2].tolist() == [0, 0]  # the residual op has nothing to do
    gate_up = torch.randn(2, 2 * I)
    g, up = gate_up[:, :I], gate_up[:, I:]
    act = torch.nn.functional.silu(g) * up
    out = st_mlp.apply_mlp(1, act.clone(), gate_up)
    want0 = (torch.nn.functional.silu(g[0]) + 2.0 * torch.arange(I)) * up[0]
    torch.testing.assert_close(out[0], want0)
    assert torch.equal(out[1], act[1])  # unsteered token untouched


def test_mlp_act_vector_needs_the_site(st):
    from roast_vllm import SteeringVectorError

    with pytest.raises(SteeringVectorError, match="mlp_act_site"):
        st.register_vector("m", SteeringVector(directions={1: torch.ones(I)}, site="mlp_act"))


def test_tensor_parallel_rank_takes_its_mlp_columns():
    s = SteeringState(L, H, 1, 2, 8, torch.float32, mlp_size=I, mlp_shard=(1, 2))
    s.register_vector(
        "m", SteeringVector(directions={0: torch.arange(I, dtype=torch.float32)}, site="mlp_act")
    )
    k = s.acquire(SteerSpec("m", 1.0))
    assert s.mlp_table.shape[-1] == I // 2
    assert torch.equal(s.mlp_table[0, k], torch.arange(I // 2, I, dtype=torch.float32))


def test_capture_records_last_prompt_token_and_follows_moves(st_mlp):
    st_mlp.capture_layers = (1, 3)
    st_mlp.set_capture(0, "c0", prompt_len=3)  # wants position 2
    st_mlp.set_capture(1, "c1", prompt_len=2)  # wants position 1
    st_mlp.move_row(1, 2, swap=False)  # condense: c1 now in row 2
    # row 0 prefills 3 tokens, row 2 prefills 2 (row 1 is empty this step)
    st_mlp.prepare_step(torch.tensor([0, 0, 0, 2, 2]), torch.tensor([0, 1, 2, 0, 1]), num_tokens=5)
    hidden, resid = torch.randn(5, H), torch.randn(5, H)
    gate_up = torch.randn(5, 2 * I)
    for layer in range(L):
        st_mlp.capture_residual(layer, hidden + layer, resid)
        st_mlp.apply_mlp(layer, torch.zeros(5, I), gate_up)
    caps = st_mlp.pop_captures(["c0", "c1"])
    torch.testing.assert_close(
        caps["c0"]["residual"], torch.stack([hidden[2] + l + resid[2] for l in (1, 3)])
    )
    torch.testing.assert_close(caps["c1"]["residual"][1], hidden[4] + 3 + resid[4])
    torch.testing.assert_close(caps["c1"]["mlp_act"][0], torch.nn.functional.silu(gate_up[4, :I]))
    assert st_mlp.pop_captures(["c0"]) == {}  # popped once


def test_capture_mean_over_positions_across_chunks(st_mlp):
    """``roast_capture_from``: the mean over prompt positions ``start ..`` (through the last),
    summed over prefill chunks; beside a last-token capture in the same steps."""
    st_mlp.capture_layers = (0, 2)
    st_mlp.set_capture(0, "m", prompt_len=7, start=2)  # mean over positions 2..6
    st_mlp.set_capture(1, "last", prompt_len=3)
    seen = {}  # (row, pos) -> residual stream per layer
    g = torch.Generator().manual_seed(3)
    steps = [  # (rows, positions) of two prefill chunks
        ([0, 0, 0, 0, 1, 1], [0, 1, 2, 3, 0, 1]),
        ([0, 0, 0, 1], [4, 5, 6, 2]),
    ]
    for rows, pos in steps:
        st_mlp.prepare_step(torch.tensor(rows), torch.tensor(pos), num_tokens=len(rows))
        hidden, resid = torch.randn(len(rows), H, generator=g), torch.randn(len(rows), H, generator=g)
        for layer in range(L):
            st_mlp.capture_residual(layer, hidden + layer, resid)
            for t, key in enumerate(zip(rows, pos)):
                seen[key + (layer,)] = hidden[t] + layer + resid[t]
        if rows is steps[0][0]:
            assert st_mlp.pop_captures(["m"]) == {}, "not done before its last position"
    caps = st_mlp.pop_captures(["m", "last"])
    want = torch.stack([torch.stack([seen[(0, p, l)] for p in range(2, 7)]).mean(0) for l in (0, 2)])
    torch.testing.assert_close(caps["m"]["residual"], want)
    torch.testing.assert_close(caps["last"]["residual"][1], seen[(1, 2, 2)])
    assert not st_mlp._cap_acc and not st_mlp._captures_pending


def test_released_slot_is_zeroed_and_reuse_sees_no_old_vector(st):
    i = st.acquire(SteerSpec("a", 3.0))  # layers 1, 2
    st.release(i)
    assert st.slot_scale[i] == 0
    assert torch.count_nonzero(st.table[:, i]) == 0  # scale and rows zeroed on release
    # the next configuration that gets this index sees only its own rows
    j = st.acquire(SteerSpec("b", 1.0, layers=(3,)))
    assert j == i
    assert torch.count_nonzero(st.table[:2, j]) == 0
    assert torch.equal(st.table[3, j], -torch.ones(H)) and st.slot_scale[j] == 1.0


def test_replaced_vector_slot_is_zeroed_when_its_last_request_leaves(st):
    st.set_row(0, SteerSpec("a", 2.0), prompt_len=1)
    i = st.row_slot_cpu[0].item()
    st.register_vector("a", SteeringVector(directions={3: torch.ones(H)}))
    assert st.slot_scale[i] == 2.0  # the running request keeps the vector it started with
    st.clear_row(0)
    assert st.slot_scale[i] == 0 and torch.count_nonzero(st.table[:, i]) == 0
    assert st.active_slots() == 0


def test_prepare_step_needs_no_forward_context(st):
    """Slots come from the runner's buffers alone: no attention metadata, no vLLM
    forward context (FlashInfer's metadata has no query_start_loc)."""
    from vllm.forward_context import is_forward_context_available

    assert not is_forward_context_available()
    st.set_row(3, SteerSpec("b", 1.0, start=4), prompt_len=2)
    st.sync_rows()
    st.prepare_step(torch.tensor([3, 3, 3]), torch.tensor([3, 4, 5]), num_tokens=3)
    k = st.row_slot_cpu[3].item()
    assert st.token_slot[:3].tolist() == [0, k, k]


def test_prepare_step_rejects_oversized_steps(st):
    with pytest.raises(RuntimeError, match="max_num_batched_tokens"):
        st.prepare_step(torch.zeros(40, dtype=torch.long), torch.zeros(40, dtype=torch.long), num_tokens=40)


def test_each_site_reads_only_its_own_slots(st_mlp, monkeypatch):
    """A token steered at one site is slot 0 for the other site's op (which so skips it,
    instead of adding a zero table row); eager steps skip a site with no steered row."""
    st_mlp.set_row(0, SteerSpec("m", 2.0), prompt_len=1)
    st_mlp.set_row(1, SteerSpec("r", 1.0), prompt_len=1)
    st_mlp.sync_rows()
    i, j = st_mlp.row_slot_cpu[0].item(), st_mlp.row_slot_cpu[1].item()
    assert st_mlp.slot_mlp[i] == 1 and st_mlp.slot_mlp[j] == 0
    st_mlp.prepare_step(torch.tensor([0, 1, 2, 1]), torch.tensor([3, 3, 3, 4]), num_tokens=4)
    assert st_mlp.mlp_token_slot[:4].tolist() == [i, 0, 0, 0]
    assert st_mlp.token_slot[:4].tolist() == [0, j, 0, j]
    assert st_mlp.step_steered_mlp and st_mlp.step_steered_residual
    st_mlp.clear_row(0)
    st_mlp.prepare_step(torch.tensor([0, 1]), torch.tensor([3, 3]), num_tokens=2)
    assert st_mlp.mlp_token_slot.count_nonzero() == 0 and st_mlp.token_slot[:2].tolist() == [0, j]
    assert not st_mlp.step_steered_mlp and st_mlp.step_steered_residual
    import roast_vllm.engine.state as state_mod

    def no_call(*a):
        raise AssertionError("the mlp_act op ran on a step with no mlp_act row")

    monkeypatch.setattr(state_mod, "steer_mlp_act", no_call)
    act = torch.randn(2, I)
    assert st_mlp.apply_mlp(1, act, torch.randn(2, 2 * I)) is act  # eager: skipped
    st_mlp.clear_row(1)
    assert st_mlp.slot_mlp.count_nonzero() == 0  # released slots hold no site either


# ---------------------------------------------------------------- Fusion Steering
class _Stream:
    """A fake runner for Fusion requests: each step lists ``(row, request id, n tokens)``;
    positions follow each request's own history (``restart`` sends one back to 0). Keeps
    every request's pre-injection stream per layer to check the engine's running mean
    against the definition (the mean over all positions so far, recomputed from scratch)."""

    def __init__(self, st):
        self.st, self.pos, self.seen, self.g = st, {}, {}, torch.Generator().manual_seed(0)

    def step(self, batch, restart=(), live=None):
        from roast_vllm.engine.state import StepRequests

        st = self.st
        qsl, ncomp, ids, rows, pos = [0], [0] * st.max_num_seqs, [None] * st.max_num_seqs, [], []
        for row, rid, n in sorted(batch):
            if rid in restart:
                self.pos[rid] = 0
                self.seen[rid] = []
            p0 = self.pos.get(rid, 0)
            ncomp[row], ids[row] = p0, rid
            while len(qsl) <= row:
                qsl.append(qsl[-1])
            qsl.append(qsl[-1] + n)
            rows += [row] * n
            pos += list(range(p0, p0 + n))
            self.pos[rid] = p0 + n
        T = len(rows)
        live = set(self.pos) if live is None else live
        st.prepare_step(torch.tensor(rows), torch.tensor(pos), T, StepRequests(qsl, ncomp, ids, live))
        hs, rs, outs = [], [], []
        for l in range(st.num_layers):
            h = torch.randn(T, st.hidden_size, generator=self.g)
            r = torch.randn(T, st.hidden_size, generator=self.g)
            hs.append(h.clone())
            rs.append(r)
            outs.append(st.apply_fusion(l, h, r))
        t = 0
        for _row, rid, n in sorted(batch):
            hist = self.seen.setdefault(rid, [])
            hist += [
                (self.pos[rid] - n + i, [hs[l][t + i] + rs[l][t + i] for l in range(st.num_layers)])
                for i in range(n)
            ]
            t += n
        return rows, pos, hs, outs

    def want(self, rid, p, x_h, layer, ref, coef, skip_first=False):
        """The definition: ``x_h + c (r - mean of the stream over positions <= p)``."""
        xs = [x[layer] for q, x in self.seen[rid] if q <= p and (q > 0 or not skip_first)]
        if skip_first and p == 0:
            return x_h
        return x_h + coef * (ref - torch.stack(xs).mean(0))


def _fusion_state():
    s = SteeringState(L, H, max_slots=3, max_num_seqs=4, max_num_tokens=64, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    refs = {k: {l: torch.randn(H, generator=g) for l in range(L)} for k in ("q1", "q2")}
    for k, d in refs.items():
        s.register_vector(k, SteeringVector(directions=d, method="fusion"))
    s.register_vector("a", SteeringVector(directions={1: torch.ones(H), 2: 2 * torch.ones(H)}))
    return s, refs


def _check_rows(fake, st, rows, pos, hs, outs, owners, refs, coefs, skip=()):
    """Every Fusion token against the definition; every other token untouched (bits)."""
    for l in range(L):
        for t, (row, p) in enumerate(zip(rows, pos)):
            rid = owners.get(row)
            if rid is None:
                assert torch.equal(outs[l][t], hs[l][t]), f"row {row} (not Fusion) changed at layer {l}"
                continue
            ref, c = refs[rid][l], coefs[rid][l]
            want = fake.want(rid, p, hs[l][t], l, ref, c, skip_first=rid in skip)
            torch.testing.assert_close(outs[l][t], want, atol=1e-5, rtol=1e-5)


def test_fusion_running_mean_across_chunks_steps_moves_and_gaps():
    """Two Fusion requests (full-layer and per-third coefficients) beside an additive one
    and a plain row: prefill in chunks, decode steps, a row move (the state follows the
    request), a step where one is not scheduled, a recompute from position 0 (preemption),
    and a finished request's state freed. Each step's output is the definition's."""
    st, refs = _fusion_state()
    coefs = {"q1": [0.8] * L, "q2": [0.5, 0.5, 1.5, -2.0]}  # 4 layers: thirds 0-1 | 2 | 3
    st.set_row(0, SteerSpec("q1", 0.8, mode="fusion"), prompt_len=7)
    st.set_row(1, SteerSpec("q2", (0.5, 1.5, -2.0), mode="fusion"), prompt_len=5)
    st.set_row(2, SteerSpec("a", 3.0), prompt_len=4)
    st.sync_rows()
    assert st.num_fusion_rows == 2 and st.num_steered_rows == 1
    for l, c in enumerate(coefs["q2"]):  # the slot's rows: c_l * r_l, and c_l
        slot = st._rows[1].slot
        assert torch.equal(st.table[l, slot], c * refs["q2"][l]) and st.fusion_coef[l, slot] == c
    fake = _Stream(st)
    owners = {0: "q1", 1: "q2"}
    # prefill in chunks: q1 4 + 3 tokens, q2 5, with the additive row 2 and plain row 3
    for batch in (
        [(0, "q1", 4), (1, "q2", 5), (2, "x", 4), (3, "y", 2)],
        [(0, "q1", 3), (2, "x", 1), (3, "y", 1)],
    ):
        rows, pos, hs, outs = fake.step(batch)
        _check_rows(fake, st, rows, pos, hs, outs, owners, refs, coefs)
        assert st.token_slot[: len(rows)].tolist() == [st._rows[2].slot if r == 2 else 0 for r in rows]
    for _ in range(2):  # decode steps
        rows, pos, hs, outs = fake.step([(0, "q1", 1), (1, "q2", 1), (2, "x", 1)])
        _check_rows(fake, st, rows, pos, hs, outs, owners, refs, coefs)
    # vLLM swaps rows 0 and 1: the running states follow the requests, not the rows
    st.move_row(0, 1, swap=True)
    owners = {0: "q2", 1: "q1"}
    rows, pos, hs, outs = fake.step([(0, "q2", 1), (1, "q1", 1)])
    _check_rows(fake, st, rows, pos, hs, outs, owners, refs, coefs)
    # q1 not scheduled for a step: vLLM removes it from the persistent batch and adds it
    # back later (a new row entry); its running mean carries on where it was
    st.clear_row(1)
    rows, pos, hs, outs = fake.step([(0, "q2", 1)])
    _check_rows(fake, st, rows, pos, hs, outs, owners, refs, coefs)
    st.set_row(1, SteerSpec("q1", 0.8, mode="fusion"), prompt_len=7)
    rows, pos, hs, outs = fake.step([(0, "q2", 1), (1, "q1", 1)])
    _check_rows(fake, st, rows, pos, hs, outs, owners, refs, coefs)
    # q2 preempted and recomputed from position 0: a fresh mean
    rows, pos, hs, outs = fake.step([(0, "q2", 6), (1, "q1", 1)], restart=("q2",))
    _check_rows(fake, st, rows, pos, hs, outs, owners, refs, coefs)
    assert st.num_fusion_gaps == 0
    # q1 finishes: its row is removed and its state freed once the runner drops it
    st.clear_row(1)
    fake.step([(0, "q2", 1)], live={"q2"})
    assert set(st._fstates) == {"q2"} and len(st._fstate_free) == st.max_num_seqs - 1
    st.clear_row(0)
    st.clear_row(2)
    fake.step([], live=set())
    assert not st._fstates and not st.step_fusion and st.active_slots() == 0


def test_fusion_under_async_scheduling_step_pattern():
    """Async scheduling (vLLM's default on CUDA; resolved off on CPU, so no engine here
    runs it) schedules step N+1 before step N's tokens are back. What reaches the Fusion
    bookkeeping: positions from the scheduler's optimistic ``num_computed_tokens`` (equal
    to the real ones without speculative decoding, which is refused), a request computed
    for one step past its stop (its token discarded), then dropped by the runner; a
    request absent for a step and re-added in another row; a preempted one recomputed
    from 0. The running means stay the definition's, no gap is counted, and the finished
    request's state is freed."""
    st, refs = _fusion_state()
    coefs = {"q1": [0.8] * L, "q2": [0.3] * L}
    st.set_row(0, SteerSpec("q1", 0.8, mode="fusion"), prompt_len=3)
    st.set_row(1, SteerSpec("q2", 0.3, mode="fusion"), prompt_len=4)
    fake = _Stream(st)
    owners = {0: "q1", 1: "q2"}
    for batch in ([(0, "q1", 3), (1, "q2", 4)], [(0, "q1", 1), (1, "q2", 1)]):
        rows, pos, hs, outs = fake.step(batch)
        _check_rows(fake, st, rows, pos, hs, outs, owners, refs, coefs)
    # q1 stopped at the step above, but the next step was already scheduled with it: one
    # more position computed for it (contiguous, so not a gap), then the runner drops it
    rows, pos, hs, outs = fake.step([(0, "q1", 1), (1, "q2", 1)])
    _check_rows(fake, st, rows, pos, hs, outs, owners, refs, coefs)
    st.clear_row(0)
    rows, pos, hs, outs = fake.step([(1, "q2", 1)], live={"q2"})
    _check_rows(fake, st, rows, pos, hs, outs, {1: "q2"}, refs, coefs)
    assert set(st._fstates) == {"q2"}
    # q2 unscheduled for a step, re-added in row 0 (async resumes keep their positions)
    st.clear_row(1)
    fake.step([], live={"q2"})
    st.set_row(0, SteerSpec("q2", 0.3, mode="fusion"), prompt_len=4)
    rows, pos, hs, outs = fake.step([(0, "q2", 1)], live={"q2"})
    _check_rows(fake, st, rows, pos, hs, outs, {0: "q2"}, refs, coefs)
    # preempted and recomputed from position 0 (prompt + generated so far, one chunk)
    rows, pos, hs, outs = fake.step([(0, "q2", 9)], restart=("q2",), live={"q2"})
    _check_rows(fake, st, rows, pos, hs, outs, {0: "q2"}, refs, coefs)
    assert st.num_fusion_gaps == 0


def test_fusion_skip_first_and_gap():
    """``skip_first``: position 0 is neither counted nor injected. A request that resumes
    anywhere but where its sum ended (a prefix-cache hit the scheduler should have
    prevented) is counted and logged."""
    st, refs = _fusion_state()
    st.set_row(0, SteerSpec("q1", 0.6, mode="fusion", skip_first=True), prompt_len=5)
    fake = _Stream(st)
    coefs = {"q1": [0.6] * L}
    for batch in ([(0, "q1", 3)], [(0, "q1", 2)], [(0, "q1", 1)]):
        rows, pos, hs, outs = fake.step(batch)
        _check_rows(fake, st, rows, pos, hs, outs, {0: "q1"}, refs, coefs, skip={"q1"})
    for l in range(L):  # position 0 of the first step came out untouched
        assert torch.equal(outs[l][0], hs[l][0]) or pos[0] != 0
    fake.pos["q1"] += 3  # three positions the forward never saw
    fake.step([(0, "q1", 1)])
    assert st.num_fusion_gaps == 1


def test_fusion_refused_where_it_cannot_apply():
    st, _ = _fusion_state()
    m = SteeringVector(directions={1: torch.ones(16)}, site="mlp_act")
    off = SteeringState(
        L, H, max_slots=2, max_num_seqs=2, max_num_tokens=8, dtype=torch.float32, fusion=False
    )
    off.register_vector("q1", SteeringVector(directions={1: torch.ones(H)}))
    with pytest.raises(SteeringVectorError, match="Fusion Steering is off"):
        off.acquire(SteerSpec("q1", 1.0, mode="fusion"))
    st2 = SteeringState(L, H, max_slots=2, max_num_seqs=2, max_num_tokens=8, dtype=torch.float32, mlp_size=16)
    st2.register_vector("m", m)
    with pytest.raises(SteeringVectorError, match="residual-stream reference"):
        st2.acquire(SteerSpec("m", 1.0, mode="fusion"))
    # the same vector, scale and layers as an additive request: a different slot
    a = st.acquire(SteerSpec("q1", 0.5))
    f = st.acquire(SteerSpec("q1", 0.5, mode="fusion"))
    assert a != f and st.fusion_coef[:, a].abs().sum() == 0 and st.fusion_coef[:, f].tolist() == [0.5] * L


# ---------------------------------------------------------------- multi-vector requests
def _combo(text):
    from roast_vllm.engine.spec import parse_steer_args

    return parse_steer_args({"steer_vectors": text})


def test_combination_fills_one_slot_with_the_sum_of_its_terms(st):
    """``a:0.5,b:-2@2-3``: layer l's row is 0.5 * a_l + (-2) * b_l on b's layers, scale 1;
    the same combination shares the slot, another one gets its own."""
    i = st.acquire(_combo("a:0.5,b:-2@2-3"))
    assert st.slot_scale[i] == 1.0 and st.active_slots() == 1
    a = {1: 1.0, 2: 2.0}
    for l in range(L):
        want = 0.5 * a.get(l, 0.0) + (2.0 if l in (2, 3) else 0.0)  # b is -1 everywhere
        assert torch.equal(st.table[l, i], torch.full((H,), want)), l
    assert st.acquire(_combo("a:0.5,b:-2@2-3")) == i and st.active_slots() == 1
    j = st.acquire(_combo("a:0.5,b:-2@2"))
    assert j != i and st.active_slots() == 2
    for k in (i, i, j):
        st.release(k)
    assert st.active_slots() == 0 and st.table.count_nonzero() == 0


def test_combination_is_applied_as_the_sum(st):
    """The op adds sum_i s_i v_i to a steered token (fp32) and nothing to the others."""
    st.set_row(0, _combo("a:0.5,b:-2"), prompt_len=2)
    st.set_row(1, SteerSpec("a", 0.5), prompt_len=2)
    st.prepare_step(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 0, 0]), num_tokens=4)
    h = torch.randn(4, H)
    out = st.apply(2, h.clone())
    assert torch.equal(out[0], h[0] + (0.5 * 2.0 + 2.0)) and torch.equal(out[1], h[1] + 3.0)
    assert torch.equal(out[2], h[2] + 0.5 * 2.0) and torch.equal(out[3], h[3])


def test_combination_of_both_sites_steers_both(st_mlp):
    """A combination of a residual and an mlp_act vector is one slot in both tables; its
    tokens are in both sites' token maps."""
    st_mlp.set_row(0, _combo("r:2,m:-1"), prompt_len=1)
    st_mlp.set_row(1, SteerSpec("m", 1.0), prompt_len=1)
    i, j = st_mlp.row_slot_cpu[0].item(), st_mlp.row_slot_cpu[1].item()
    assert (st_mlp.slot_res[i], st_mlp.slot_mlp[i]) == (1, 1) and (
        st_mlp.slot_res[j],
        st_mlp.slot_mlp[j],
    ) == (0, 1)
    assert torch.equal(st_mlp.table[1, i], torch.full((H,), 2.0))
    assert torch.equal(st_mlp.mlp_table[1, i], -torch.arange(I, dtype=torch.float32))
    st_mlp.prepare_step(torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0]), num_tokens=3)
    assert st_mlp.token_slot[:3].tolist() == [i, 0, 0]
    assert st_mlp.mlp_token_slot[:3].tolist() == [i, j, 0]
    assert st_mlp.step_steered_residual and st_mlp.step_steered_mlp
    st_mlp.clear_row(0)
    st_mlp.clear_row(1)
    assert st_mlp.slot_res.count_nonzero() == 0 and st_mlp.slot_mlp.count_nonzero() == 0


def test_combination_pins_each_vectors_version(st):
    """Re-registering one of its vectors changes only combinations submitted after it."""
    old = st.names["a"]
    spec = _combo("a:1,b:1")
    import dataclasses

    pinned = dataclasses.replace(spec, digest=f"{old},{st.names['b']}")
    st.register_vector("a", SteeringVector(directions={1: 10 * torch.ones(H)}))
    i = st.acquire(pinned)
    assert torch.equal(st.table[1, i], torch.full((H,), 1.0 - 1.0))  # old a_1 = 1, b = -1
    k = st.acquire(_combo("a:1,b:1"))  # the current version
    assert k != i and torch.equal(st.table[1, k], torch.full((H,), 10.0 - 1.0))
    with pytest.raises(SteeringVectorError, match="unknown steering vector 'c'"):
        st.acquire(_combo("a:1,c:1"))
