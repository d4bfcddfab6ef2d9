//! Throughput of the CPU kernels in GB/s (bytes read plus written), to compare against the machine's
//! memory bandwidth: `cargo bench -p kiln-kernels`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_kernels::{bf16, cpu};

/// 4 MiB and 64 MiB of f32: one in cache-sized pieces, one well past the last-level cache.
const SIZES: [usize; 2] = [1 << 20, 1 << 24];

fn bench_kernels(c: &mut Criterion) {
    let mut group = c.benchmark_group("kernels");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for elements in SIZES {
        let source: Vec<f32> = (0..elements).map(|index| index as f32 * 1e-3).collect();
        let mut destination = vec![1.0f32; elements];
        let mut wire = vec![bf16::ZERO; elements];
        let mib = (elements * 4) >> 20;
        // add_assign reads two f32 buffers and writes one.
        group.throughput(Throughput::Bytes((elements * 12) as u64));
        group.bench_function(format!("add_assign_f32_{mib}MiB"), |b| {
            b.iter(|| cpu::add_assign(black_box(&mut destination), black_box(&source)))
        });
        // to_bf16 reads 4 bytes and writes 2 per element.
        group.throughput(Throughput::Bytes((elements * 6) as u64));
        group.bench_function(format!("to_bf16_{mib}MiB"), |b| {
            b.iter(|| cpu::to_bf16(black_box(&source), black_box(&mut wire)))
        });
        // add_assign_bf16 reads 4 + 2 bytes and writes 4 per element.
        group.throughput(Throughput::Bytes((elements * 10) as u64));
        group.bench_function(format!("add_assign_bf16_{mib}MiB"), |b| {
            b.iter(|| cpu::add_assign_bf16(black_box(&mut destination), black_box(&wire)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_kernels);
criterion_main!(benches);
