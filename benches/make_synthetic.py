"""Writes a synthetic classification CSV for the training benchmarks: ROWS rows of FEATURES Gaussian
features around CLASSES random centres, label column `label`. Usage: python make_synthetic.py OUT ROWS
FEATURES CLASSES SEED (the standard library only)."""
import random
import sys

out, rows, features, classes, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
generator = random.Random(seed)
centres = [[generator.gauss(0, 3) for _ in range(features)] for _ in range(classes)]
with open(out, "w") as file:
    file.write(",".join([f"f{index}" for index in range(features)] + ["label"]) + "\n")
    for _ in range(rows):
        label = generator.randrange(classes)
        values = (f"{centre + generator.gauss(0, 1):.4f}" for centre in centres[label])
        file.write(",".join(values) + f",{label}\n")
