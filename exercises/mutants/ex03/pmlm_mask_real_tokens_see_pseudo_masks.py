# Real appended tokens also attend to the [P]s of their span: their encodings change with the pseudo inputs.
import torch

from nanomodels.pmlm import AE, PSEUDO, REAL


def pmlm_mask(kind: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    kq, kk = kind[..., :, None], kind[..., None, :]
    sq, sk = step[..., :, None], step[..., None, :]
    ae_query = (kq == AE) & (kk == AE)
    pseudo_query = (kq == PSEUDO) & ((kk == AE) | ((kk == REAL) & (sk < sq)) | ((kk == PSEUDO) & (sk == sq)))
    real_query = (kq == REAL) & ((kk == AE) | ((kk == REAL) & (sk <= sq)) | ((kk == PSEUDO) & (sk == sq)))
    return ae_query | pseudo_query | real_query
