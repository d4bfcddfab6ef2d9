"""Optuna's TPE on the functions `kiln bench tpe` measures Kiln's TPE on (Branin and Hartmann-6, the same
spaces and formulas as kiln_coordinator::sweep::objectives), with Optuna's default TPESampler and seeds
0..SEEDS-1. Prints one JSON object: per function, per seed, the best value after each trial, and Optuna's
seconds per trial.

    python optuna_tpe.py --seeds 10 --trials 50
"""

import argparse
import json
import math
import time

import optuna


def branin(trial):
    x = trial.suggest_float("x", -5.0, 10.0)
    y = trial.suggest_float("y", 0.0, 15.0)
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return (y - b * x * x + c * x - 6) ** 2 + 10 * (1 - t) * math.cos(x) + 10


ALPHA = [1.0, 1.2, 3.0, 3.2]
A = [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]]
P = [
    [0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886],
    [0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
    [0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650],
    [0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381],
]


def hartmann6(trial):
    x = [trial.suggest_float(f"x{j}", 0.0, 1.0) for j in range(6)]
    return -sum(ALPHA[i] * math.exp(-sum(A[i][j] * (x[j] - P[i][j]) ** 2 for j in range(6))) for i in range(4))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--trials", type=int, default=50)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = {"optuna_version": optuna.__version__, "functions": {}}
    for name, objective in (("branin", branin), ("hartmann6", hartmann6)):
        curves = []
        started = time.perf_counter()
        for seed in range(args.seeds):
            study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
            study.optimize(objective, n_trials=args.trials)
            best, curve = math.inf, []
            for trial in study.trials:
                best = min(best, trial.value)
                curve.append(best)
            curves.append(curve)
        seconds = (time.perf_counter() - started) / (args.seeds * args.trials)
        out["functions"][name] = {"curves": curves, "seconds_per_trial": seconds}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
