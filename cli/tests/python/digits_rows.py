"""The first rows of the digits CSV as the serving tests send them: pixels as FP32 [rows, 64], and labels."""

import csv

import numpy as np


def load(dataset, count):
    with open(dataset, newline="") as file:
        reader = csv.reader(file)
        header = next(reader)
        label_column = header.index("digit")
        rows, labels = [], []
        for row in reader:
            labels.append(int(float(row[label_column])))
            rows.append([float(value) for index, value in enumerate(row) if index != label_column])
    return np.array(rows[:count], dtype=np.float32), np.array(labels[:count])
