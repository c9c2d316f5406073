# Lets N count sublayers: gamma = sqrt(log 4N) for a single stack.
import math


def subln_gamma(encoder_layers: int = 0, decoder_layers: int = 0) -> dict:
    for name, value in (("encoder_layers", encoder_layers), ("decoder_layers", decoder_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: must be an integer >= 0, got {value!r}")
    if encoder_layers == 0 and decoder_layers == 0:
        raise ValueError("encoder_layers, decoder_layers: at least one must be > 0 (both are 0)")
    N, M = 2 * encoder_layers, 2 * decoder_layers
    if N and M:
        return {"encoder": math.sqrt(math.log(3 * M) * math.log(2 * N) / 3), "decoder": math.sqrt(math.log(3 * M))}
    side, L = ("encoder", N) if N else ("decoder", M)
    return {side: math.sqrt(math.log(2 * L))}
