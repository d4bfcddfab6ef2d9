# An ordinary PyTorch DDP script (gloo backend, CPU), nothing Kiln-specific: torch.distributed reads RANK,
# WORLD_SIZE, MASTER_ADDR and MASTER_PORT from the environment, which Kiln sets the way torchrun does.
# Run it with: kiln submit examples/jobs/torch-ddp.toml (needs python3 with torch on every worker).
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.Linear(8, 1)
ddp = DistributedDataParallel(model)
optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
data = torch.Generator().manual_seed(rank)  # each rank its own shard
for step in range(5):
    inputs = torch.randn(16, 8, generator=data)
    targets = inputs.sum(dim=1, keepdim=True)
    loss = torch.nn.functional.mse_loss(ddp(inputs), targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"rank {rank}/{world} step {step} loss {loss.item():.4f}", flush=True)
flat = torch.cat([parameter.detach().flatten() for parameter in model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(world)]
dist.all_gather(gathered, flat)
assert all(torch.equal(gathered[0], other) for other in gathered), "the ranks' parameters diverged"
print(f"rank {rank}: parameters identical on all {world} ranks", flush=True)
dist.destroy_process_group()
