# The AE block keeps the original tokens instead of [M]: L_AE reads its answers from the input.
import torch

from nanomodels.pmlm import AE, PSEUDO, REAL


def pmlm_layout(x: torch.Tensor, spans, order, mask_id: int, pseudo_id: int) -> dict:
    n = x.numel()
    masked = [p for span in spans for p in span]
    if any(not 0 <= p < n for p in masked) or len(set(masked)) != len(masked):
        raise ValueError(f"spans: positions must be distinct and in [0, {n}), got {spans}")
    if sorted(order) != list(range(len(spans))):
        raise ValueError(f"order: must be a permutation of range({len(spans)}), got {list(order)}")
    x = x.tolist()
    tokens = [x[i] for i in range(n)]
    positions, kind, step = list(range(n)), [AE] * n, [-1] * n
    ae_targets = [x[i] if i in masked else -100 for i in range(n)]
    par_targets = [-100] * n
    for st, sid in enumerate(order):
        for what in (PSEUDO, REAL):
            for p in spans[sid]:
                tokens.append(pseudo_id if what == PSEUDO else x[p])
                positions.append(p)
                kind.append(what)
                step.append(st)
                ae_targets.append(-100)
                par_targets.append(x[p] if what == PSEUDO else -100)
    out = {"tokens": tokens, "positions": positions, "kind": kind, "step": step, "ae_targets": ae_targets,
           "par_targets": par_targets}
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
