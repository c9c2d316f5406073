"""Chapter 05's sweep: the largest learning rate at which Post-LN, Pre-LN, Sub-LN and DeepNorm still train, at a
fixed depth, on the toy task of scripts/ch04_deepnet.py (same model, data, optimizer; no warmup).

    OMP_NUM_THREADS=1 python scripts/ch05_subln.py lr --depths 24 --variants post pre subln deepnorm \\
        --lrs 1e-3 3e-3 1e-2 3e-2 --seeds 0 1 2 --steps 300 --out ch05_lr.json
    OMP_NUM_THREADS=1 python scripts/ch05_subln.py lr --depths 24 --variants post pre subln deepnorm \\
        --lrs 3e-4 1e-1 --seeds 0 1 2 --steps 300 --out ch05_lr_extra.json
"""

from ch04_deepnet import main

if __name__ == "__main__":
    main()
