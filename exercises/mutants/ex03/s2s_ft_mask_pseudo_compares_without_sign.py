# Pseudo rows compare w_key < -w_query with the sign mixed up (w_key > w_query): they see every true key.
import torch


def s2s_ft_mask(src_len: int, target_span_ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(target_span_ids, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 1 or bool((ids[1:] < ids[:-1]).any())):
        raise ValueError(f"target_span_ids: must be >= 1 and non-decreasing, got {ids.tolist()}")
    w = torch.cat([torch.zeros(src_len, dtype=torch.long), ids, -ids])
    wq, wk = w[:, None], w[None, :]
    true_key = wk >= 0
    real_rows = (wq >= 0) & true_key & (wk <= wq)
    pseudo_rows = (wq < 0) & ((true_key & (wk > wq)) | (wk == wq))
    return real_rows | pseudo_rows
