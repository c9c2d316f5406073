"""Sequence-parallel dilated attention on 2 CPU processes (gloo) equals one process: outputs and gradients.

Each rank holds half the sequence; patterns with w <= L stay local, longer ones all-gather the sparsified K/V.
"""

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanomodels.dilated import dilated_attention

T, L, WORLD = 64, 32, 2
CASES = {"local and spanning": ([8, 32, 64], [1, 2, 4]), "spanning, w > T": ([16, 128], [1, 8])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def full_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, T, 8, dtype=torch.float64, generator=g) for _ in range(4)]  # q, k, v, dout


def _worker(rank, port, path):
    from nanomodels.dilated_parallel import sequence_parallel_dilated_attention

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    try:
        for name, (ws, rs) in CASES.items():
            for causal in (False, True):
                q, k, v, dout = full_problem()
                local = [x[:, :, rank * L:(rank + 1) * L].clone().requires_grad_() for x in (q, k, v)]
                stats = {}
                out = sequence_parallel_dilated_attention(*local, ws, rs, causal=causal, stats=stats)
                out.backward(dout[:, :, rank * L:(rank + 1) * L])
                full = [x.clone().requires_grad_() for x in (q, k, v)]
                want = dilated_attention(*full, ws, rs, causal=causal)
                want.backward(dout)
                diffs = {"out": (out - want[:, :, rank * L:(rank + 1) * L]).abs().max().item()}
                for n, a, b in zip("qkv", local, full):
                    diffs["d" + n] = (a.grad - b.grad[:, :, rank * L:(rank + 1) * L]).abs().max().item()
                diffs["grad_norm"] = sum(a.grad.abs().max().item() for a in local)
                diffs["bytes_received"] = stats.get("bytes_received", 0)
                results[f"{name}, causal={causal}"] = diffs
    finally:
        dist.destroy_process_group()
    with open(f"{path}.{rank}", "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "result"
    mp.spawn(_worker, args=(free_port(), str(path)), nprocs=WORLD, join=True)
    return [json.loads(open(f"{path}.{rank}").read()) for rank in range(WORLD)]


@pytest.mark.parametrize("case", [f"{n}, causal={c}" for n in CASES for c in (False, True)])
def test_two_processes_give_the_single_process_outputs_and_gradients(two_ranks, case):
    for rank, results in enumerate(two_ranks):
        diffs = results[case]
        assert diffs["grad_norm"] > 1e-3, "no gradient reached the inputs: the comparison would be vacuous"
        for key in ("out", "dq", "dk", "dv"):
            assert diffs[key] < 1e-10, f"rank {rank}, {case}: {key} differs from one process by {diffs[key]:.3g}"


def test_only_patterns_longer_than_a_chunk_communicate_and_exactly_their_sparsified_rows(two_ranks):
    # "local and spanning": only (64, 4) spans the ranks: K~ and V~ of the other rank, L/r rows x H x D x 8 bytes
    for results in two_ranks:
        assert results["local and spanning, causal=False"]["bytes_received"] == 2 * 2 * 4 * (L // 4) * 8 * 8
        assert results["spanning, w > T, causal=True"]["bytes_received"] == 2 * 2 * 4 * (L // 8) * 8 * 8


@pytest.mark.parametrize("ws, rs, match", [([12], [1], "must divide the chunk length"),
                                           ([64], [64], "must divide the chunk length"),
                                           ([8, 64], [1, 2], "init_process_group")])
def test_chunks_that_split_segments_unevenly_or_no_process_group_raise_value_error(ws, rs, match):
    from nanomodels.dilated_parallel import sequence_parallel_dilated_attention

    q = torch.zeros(1, 1, 32, 4)
    with pytest.raises(ValueError, match=match):
        sequence_parallel_dilated_attention(q, q, q, ws, rs)
