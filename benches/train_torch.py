"""The baseline for `benches/run-train.sh`: the same MLP, data, batch and optimizer in PyTorch, one thread.

Prints one JSON line: {"samples_per_second": ..., "epochs": ...}, the median over epochs 2.. of the
training rows per second (the first epoch warms up), as Kiln's trainer reports it.
Usage: python train_torch.py DATA.csv LABEL EPOCHS BATCH
"""
import json
import statistics
import sys
import time

import numpy as np
import torch

path, label, epochs, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
torch.manual_seed(0)
header = open(path).readline().strip().split(",")
data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32)
label_index = header.index(label)
labels = torch.from_numpy(data[:, label_index].astype(np.int64))
features = torch.from_numpy(np.delete(data, label_index, axis=1))
rows = int(len(labels) * 0.8)  # the same 80/20 split as the Kiln job
train_x, train_y = features[:rows], labels[:rows]
train_x = (train_x - train_x.mean(0)) / train_x.std(0).clamp_min(1e-6)
classes = int(labels.max()) + 1
model = torch.nn.Sequential(
    torch.nn.Linear(features.shape[1], 256), torch.nn.ReLU(),
    torch.nn.Linear(256, 256), torch.nn.ReLU(),
    torch.nn.Linear(256, classes),
)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_function = torch.nn.CrossEntropyLoss()
rates = []
for epoch in range(epochs):
    order = torch.randperm(rows)
    started = time.perf_counter()
    for start in range(0, rows, batch):
        index = order[start:start + batch]
        loss = loss_function(model(train_x[index]), train_y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rates.append(rows / (time.perf_counter() - started))
print(json.dumps({"samples_per_second": statistics.median(rates[1:] or rates), "epochs": epochs}))
