"""The quality suite (issue 11): cases with retrained ground truth, a grid study of the
estimator's settings, and a report of each candidate default's regret.

Run from the repository root, in this order (each step is resumable; see each module)::

    python -m benchmarks.quality.ground_truth          # retrained ground truth, all cases
    python -m benchmarks.quality.grid                  # featurize + score + LDS grid
    python -m benchmarks.quality.report                # benchmarks/quality/report.md

Everything heavy is cached under ``runs/quality/<case>/`` (git-ignored).
"""
