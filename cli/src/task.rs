//! `kiln task …`: programs that run as the ranks of a Kiln job (the worker starts them like any command).
//!
//! `kiln task allreduce` meets the other ranks through the coordinator, joins the ring, and all-reduces
//! buffers of the given sizes: with `--check` it verifies every element against the exact sum, and rank 0
//! prints one JSON line per size with the time and the bus bandwidth (size × 2(n−1)/n ÷ time, the figure
//! nccl-tests reports), which `benches/run-allreduce.sh` collects.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use kiln_worker::collective::{self, CollectiveConfig, Communicator, Compression, RankEnvironment, ReduceOp};
use serde::Serialize;

#[derive(Subcommand)]
pub enum TaskCommand {
    /// All-reduce benchmark and check across the ranks of this job.
    Allreduce(AllreduceArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum WireFormat {
    F32,
    Bf16,
}

#[derive(Args)]
pub struct AllreduceArgs {
    /// Buffer sizes, comma-separated (e.g. 1MiB,16MiB,256MiB).
    #[arg(long, value_delimiter = ',', default_value = "1MiB,16MiB")]
    sizes: Vec<String>,
    /// Timed all-reduces per size (after one untimed warm-up).
    #[arg(long, default_value_t = 5)]
    iterations: u32,
    #[arg(long, value_enum, default_value = "f32")]
    wire: WireFormat,
    /// Verify every element against the exact sum.
    #[arg(long)]
    check: bool,
    /// Per-operation timeout of the collectives.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    timeout: Duration,
}

#[derive(Serialize)]
struct SizeResult {
    bytes: usize,
    world: u32,
    wire: &'static str,
    iterations: u32,
    seconds_per_iteration: f64,
    algorithm_gbps: f64,
    bus_gbps: f64,
}

/// Rank `rank`'s value at `index`: integers small enough that every sum is exact in f32.
fn value(rank: u32, index: usize) -> f32 {
    ((index % 1024) + rank as usize * 7) as f32
}

pub async fn run(command: TaskCommand) -> Result<()> {
    match command {
        TaskCommand::Allreduce(args) => allreduce(args).await,
    }
}

async fn allreduce(args: AllreduceArgs) -> Result<()> {
    let environment = RankEnvironment::from_environment()?;
    let mut sizes = Vec::new();
    for size in &args.sizes {
        let bytes =
            kiln_coordinator::spec::parse_memory(size).map_err(|message| anyhow::anyhow!("--sizes: {message}"))?;
        if bytes % 4 != 0 {
            bail!("--sizes: {size} is not a whole number of f32 values (a multiple of 4 bytes)");
        }
        sizes.push(bytes as usize);
    }
    let config = CollectiveConfig {
        timeout: args.timeout,
        compression: match args.wire {
            WireFormat::F32 => Compression::None,
            WireFormat::Bf16 => Compression::Bf16,
        },
        ..CollectiveConfig::default()
    };
    let mut communicator = collective::join(&environment, config).await?;
    let (rank, world) = (communicator.rank(), communicator.world_size());
    eprintln!("rank {rank} of {world} joined the ring");
    let check = args.check;
    let iterations = args.iterations.max(1);
    let wire = match args.wire {
        WireFormat::F32 => "f32",
        WireFormat::Bf16 => "bf16",
    };
    // The collectives block; they run off the async runtime.
    tokio::task::spawn_blocking(move || -> Result<()> {
        for bytes in sizes {
            let elements = bytes / 4;
            let fill = |buffer: &mut Vec<f32>| {
                buffer.clear();
                buffer.extend((0..elements).map(|index| value(rank, index)));
            };
            let mut buffer = Vec::with_capacity(elements);
            fill(&mut buffer);
            communicator.all_reduce(&mut buffer, ReduceOp::Sum)?;
            if check {
                for (index, reduced) in buffer.iter().enumerate() {
                    let exact: f32 = (0..world).map(|other| value(other, index)).sum();
                    let tolerance = if wire == "bf16" { exact.abs() / 128.0 } else { 0.0 };
                    if (reduced - exact).abs() > tolerance {
                        bail!("all-reduce of {bytes} bytes: element {index} is {reduced}, expected {exact}");
                    }
                }
                println!("all-reduce check passed: {bytes} bytes, {world} ranks, {wire} on the wire");
            }
            let mut elapsed = Duration::ZERO;
            for _ in 0..iterations {
                fill(&mut buffer);
                communicator.barrier()?;
                let started = Instant::now();
                communicator.all_reduce(&mut buffer, ReduceOp::Sum)?;
                elapsed += started.elapsed();
            }
            let seconds = elapsed.as_secs_f64() / f64::from(iterations);
            let algorithm_gbps = bytes as f64 / seconds / 1e9;
            let bus_gbps = algorithm_gbps * 2.0 * f64::from(world - 1) / f64::from(world);
            if rank == 0 {
                let result = SizeResult {
                    bytes,
                    world,
                    wire,
                    iterations,
                    seconds_per_iteration: seconds,
                    algorithm_gbps,
                    bus_gbps,
                };
                println!("{}", serde_json::to_string(&result)?);
            }
        }
        Ok(())
    })
    .await??;
    Ok(())
}
