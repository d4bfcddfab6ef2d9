//! Throughput of the CPU kernels in GB/s (bytes read plus written), beside the machine's memory bandwidth
//! measured in the same run the way STREAM does (`stream_copy`: `a[i] = b[i]`; `stream_triad`:
//! `a[i] = b[i] + s * c[i]`, both on all threads): `cargo bench -p kiln-kernels`. With `--features cuda`
//! on a machine with a GPU, the group `cuda` measures the CUDA kernels beside a device-to-device copy.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kiln_kernels::{AdamStep, bf16, cpu};
use rayon::prelude::*;

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
        let mut third = vec![0.5f32; elements];
        // The STREAM references, split across threads like the kernels.
        group.throughput(Throughput::Bytes((elements * 8) as u64));
        group.bench_function(format!("stream_copy_{mib}MiB"), |b| {
            b.iter(|| {
                destination
                    .par_chunks_mut(cpu::CHUNK_ELEMENTS)
                    .zip(source.par_chunks(cpu::CHUNK_ELEMENTS))
                    .for_each(|(destination, source)| destination.copy_from_slice(black_box(source)))
            })
        });
        group.throughput(Throughput::Bytes((elements * 12) as u64));
        group.bench_function(format!("stream_triad_{mib}MiB"), |b| {
            let factor = black_box(3.0f32);
            b.iter(|| {
                third
                    .par_chunks_mut(cpu::CHUNK_ELEMENTS)
                    .zip(source.par_chunks(cpu::CHUNK_ELEMENTS))
                    .zip(destination.par_chunks(cpu::CHUNK_ELEMENTS))
                    .for_each(|((out, b), c)| {
                        for ((out, b), c) in out.iter_mut().zip(b).zip(c) {
                            *out = b + factor * c;
                        }
                    })
            })
        });
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
        // sum_bf16_into over two buffers reads 2 + 2 bytes and writes 2 per element.
        let other_wire = wire.clone();
        let mut reduced = vec![bf16::ZERO; elements];
        group.throughput(Throughput::Bytes((elements * 6) as u64));
        group.bench_function(format!("sum_bf16_2x_{mib}MiB"), |b| {
            b.iter(|| cpu::sum_bf16_into(black_box(&mut reduced), &[&wire, &other_wire]))
        });
        // adam_step reads parameters, gradients and two moments and writes three of them: 28 bytes.
        let (mut first, mut second) = (vec![0.0f32; elements], vec![0.0f32; elements]);
        let step = AdamStep::new(1e-3, 10);
        group.throughput(Throughput::Bytes((elements * 28) as u64));
        group.bench_function(format!("adam_step_{mib}MiB"), |b| {
            b.iter(|| cpu::adam_step(black_box(&mut destination), &source, &mut first, &mut second, &step))
        });
    }
    group.finish();
}

/// The CUDA kernels on device buffers (the `cuda` feature, a GPU): GB/s beside a device-to-device copy,
/// the GPU's STREAM copy. 256 MiB per buffer, so a launch and the synchronisation after it are small
/// against the memory traffic. Without a GPU the group says so and measures nothing.
#[cfg(feature = "cuda")]
fn bench_cuda(c: &mut Criterion) {
    use kiln_kernels::cuda::CudaKernels;

    let kernels = match CudaKernels::new(0) {
        Ok(kernels) => kernels,
        Err(error) => {
            eprintln!("cuda kernels not measured: {error}");
            return;
        }
    };
    let stream = kernels.stream().clone();
    let elements = 1usize << 26;
    let mib = (elements * 4) >> 20;
    let host: Vec<f32> = (0..elements).map(|index| index as f32 * 1e-3).collect();
    let source = stream.clone_htod(&host).expect("copying the source to the GPU");
    let mut destination = stream.clone_htod(&host).expect("copying the destination to the GPU");
    let mut wire = stream.alloc_zeros::<u16>(elements).expect("allocating the bf16 buffer");
    let (mut first, mut second) = (
        stream
            .alloc_zeros::<f32>(elements)
            .expect("allocating the first moment"),
        stream
            .alloc_zeros::<f32>(elements)
            .expect("allocating the second moment"),
    );
    let mut group = c.benchmark_group("cuda");
    group.sample_size(30);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes((elements * 8) as u64));
    group.bench_function(format!("device_copy_{mib}MiB"), |b| {
        b.iter(|| {
            stream.memcpy_dtod(&source, &mut destination).unwrap();
            stream.synchronize().unwrap();
        })
    });
    group.throughput(Throughput::Bytes((elements * 12) as u64));
    group.bench_function(format!("add_assign_f32_{mib}MiB"), |b| {
        b.iter(|| {
            kernels.add_assign(&mut destination, &source).unwrap();
            stream.synchronize().unwrap();
        })
    });
    group.throughput(Throughput::Bytes((elements * 8) as u64));
    group.bench_function(format!("scale_f32_{mib}MiB"), |b| {
        b.iter(|| {
            kernels.scale(&mut destination, 0.5).unwrap();
            stream.synchronize().unwrap();
        })
    });
    group.throughput(Throughput::Bytes((elements * 6) as u64));
    group.bench_function(format!("to_bf16_{mib}MiB"), |b| {
        b.iter(|| {
            kernels.to_bf16(&source, &mut wire).unwrap();
            stream.synchronize().unwrap();
        })
    });
    group.throughput(Throughput::Bytes((elements * 10) as u64));
    group.bench_function(format!("add_assign_bf16_{mib}MiB"), |b| {
        b.iter(|| {
            kernels.add_assign_bf16(&mut destination, &wire).unwrap();
            stream.synchronize().unwrap();
        })
    });
    let step = AdamStep::new(1e-3, 10);
    group.throughput(Throughput::Bytes((elements * 28) as u64));
    group.bench_function(format!("adam_step_{mib}MiB"), |b| {
        b.iter(|| {
            kernels
                .adam_step(&mut destination, &source, &mut first, &mut second, &step)
                .unwrap();
            stream.synchronize().unwrap();
        })
    });
    group.finish();
}

#[cfg(not(feature = "cuda"))]
fn bench_cuda(_: &mut Criterion) {}

criterion_group!(benches, bench_kernels, bench_cuda);
criterion_main!(benches);
