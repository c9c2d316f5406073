# A [P] sees the [P]s of every span, not only its own.
import torch

from nanomodels.pmlm import AE, PSEUDO, REAL


def pmlm_mask(kind: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    kq, kk = kind[..., :, None], kind[..., None, :]
    sq, sk = step[..., :, None], step[..., None, :]
    ae_query = (kq == AE) & (kk == AE)
    pseudo_query = (kq == PSEUDO) & ((kk == AE) | ((kk == REAL) & (sk < sq)) | (kk == PSEUDO))
    real_query = (kq == REAL) & ((kk == AE) | ((kk == REAL) & (sk <= sq)))
    return ae_query | pseudo_query | real_query
