# Never feeds the predicted token back: every [MASK] sits at the same position and sees only the prompt.
import torch

from nanomodels.masks import _check_length


@torch.no_grad()
def cloze_decode(model, prefix: torch.Tensor, steps: int, mask_id: int, *, objective: str = "seq2seq"):
    if objective not in ("seq2seq", "left_to_right"):
        raise ValueError(f"objective: decoding needs 'seq2seq' or 'left_to_right', got {objective!r}")
    _check_length("steps", steps)
    B = prefix.size(0)
    cache = [{} for _ in model.blocks]
    model(prefix, causal=objective == "left_to_right", cache=cache)
    out, all_logits = [], []
    for _ in range(steps):
        scratch = [dict(layer) for layer in cache]
        logits, _ = model(torch.full((B, 1), mask_id, device=prefix.device), causal=False, cache=scratch)
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        all_logits.append(logits[:, -1])
        out.append(token)
    if not out:
        return prefix.new_zeros(B, 0), torch.zeros(B, 0, model.config.vocab_size)
    return torch.cat(out, dim=1), torch.stack(all_logits, dim=1)
