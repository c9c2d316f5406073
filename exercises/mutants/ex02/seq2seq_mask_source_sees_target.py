# Source rows see the whole sequence (bidirectional over source AND target): the source reads the answer.
import torch

from nanomodels.masks import _check_length


def seq2seq_mask(src_len: int, tgt_len: int) -> torch.Tensor:
    _check_length("src_len", src_len)
    _check_length("tgt_len", tgt_len)
    n = src_len + tgt_len
    query, key = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return (key < src_len) | (query < src_len) | (key <= query)
