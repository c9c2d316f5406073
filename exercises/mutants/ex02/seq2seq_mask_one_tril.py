# One tril over the whole sequence: that is the left-to-right mask; source rows no longer see the later source.
import torch

from nanomodels.masks import _check_length


def seq2seq_mask(src_len: int, tgt_len: int) -> torch.Tensor:
    _check_length("src_len", src_len)
    _check_length("tgt_len", tgt_len)
    n = src_len + tgt_len
    return torch.ones(n, n, dtype=torch.bool).tril()
