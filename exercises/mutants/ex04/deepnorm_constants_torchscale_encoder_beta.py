# Copies torchscale's enc-dec encoder beta, 1.15 (N^4 M)^(-1/16), instead of the paper's 0.87.
from nanomodels.deepnet import _check_layers


def deepnorm_constants(encoder_layers: int = 0, decoder_layers: int = 0) -> dict:
    _check_layers(encoder_layers, decoder_layers)
    N, M = encoder_layers, decoder_layers
    if N and M:
        return {"encoder": (0.81 * (N ** 4 * M) ** (1 / 16), 1.15 * (N ** 4 * M) ** (-1 / 16)),
                "decoder": ((3 * M) ** (1 / 4), (12 * M) ** (-1 / 4))}
    side, L = ("encoder", N) if N else ("decoder", M)
    return {side: ((2 * L) ** (1 / 4), (8 * L) ** (-1 / 4))}
