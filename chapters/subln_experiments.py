"""Chapter 05's experiments: the largest learning rate at which Post-LN, Pre-LN, Sub-LN and DeepNorm still train at a
fixed depth, on chapter 04's toy task (the same model, data and optimizer, from deepnet_experiments; no warmup).

    OMP_NUM_THREADS=1 python chapters/subln_experiments.py lr --depths 24 --variants post pre subln deepnorm \\
        --lrs 1e-3 3e-3 1e-2 3e-2 --seeds 0 1 2 --steps 300 --out ch05_lr.json
    OMP_NUM_THREADS=1 python chapters/subln_experiments.py lr --depths 24 --variants post pre subln deepnorm \\
        --lrs 3e-4 1e-1 --seeds 0 1 2 --steps 300 --out ch05_lr_extra.json
    OMP_NUM_THREADS=1 python chapters/subln_experiments.py lr --depths 24 --variants post \
        --lrs 1e-3 3e-3 1e-2 3e-2 --seeds 0 1 2 3 4 --steps 300 --out ch05_lr_post.json
    OMP_NUM_THREADS=1 python chapters/subln_experiments.py lr --depths 24 --variants pre subln deepnorm \
        --lrs 1e-3 3e-3 1e-2 3e-2 --seeds 3 4 --steps 300 --out ch05_lr_s34.json

Results go to chapters/results/. The chapter 05 notebook imports this module as its `exp`.
"""

from deepnet_experiments import LABELS, TOY, VARIANTS, build, fib_batch, main, train_run, verdict

__all__ = ["LABELS", "TOY", "VARIANTS", "build", "fib_batch", "main", "train_run", "verdict"]

if __name__ == "__main__":
    main()
