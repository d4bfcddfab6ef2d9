//! The collectives over real loopback TCP: one thread per rank, checked against plain sums.

use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use super::*;

fn config(compression: Compression) -> CollectiveConfig {
    CollectiveConfig {
        timeout: Duration::from_secs(20),
        // Small chunks, so even short buffers stream in several pieces.
        chunk_bytes: 256,
        compression,
    }
}

/// Runs `body` on `world` ranks joined in a ring; returns what each rank returned, in rank order.
fn on_ranks<T: Send + 'static>(
    world: u32,
    config: CollectiveConfig,
    body: impl Fn(&mut RingCommunicator) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let addresses = Arc::new(Mutex::new(vec![String::new(); world as usize]));
    let published = Arc::new(Barrier::new(world as usize));
    let body = Arc::new(body);
    let threads: Vec<_> = (0..world)
        .map(|rank| {
            let (addresses, published, body, config) =
                (addresses.clone(), published.clone(), body.clone(), config.clone());
            std::thread::spawn(move || {
                let (listener, address) = RingCommunicator::bind("127.0.0.1").unwrap();
                addresses.lock().unwrap()[rank as usize] = address.to_string();
                published.wait();
                let all = addresses.lock().unwrap().clone();
                let mut communicator = RingCommunicator::connect(listener, rank, &all, 7, config).unwrap();
                body(&mut communicator)
            })
        })
        .collect();
    threads.into_iter().map(|thread| thread.join().unwrap()).collect()
}

/// Rank r's test input: distinct per rank and element, exactly representable sums.
fn input(rank: u32, length: usize) -> Vec<f32> {
    (0..length)
        .map(|index| (rank as usize * 1000 + index % 997) as f32)
        .collect()
}

#[test]
fn all_reduce_is_the_elementwise_sum_for_every_world_and_length() {
    // 0, 1, a prime, lengths not divisible by the world size, and one longer than a chunk many times over.
    // Every segment below 1 MiB travels on the calling thread; 1,100,003 elements make segments above it
    // (at 2 and 3 ranks) go through the sending thread.
    let cases = (1..=5u32).flat_map(|world| [0usize, 1, 2, 13, 1000, 70_001].map(move |length| (world, length)));
    for (world, length) in cases.chain([(2, 1_100_003), (3, 1_100_003)]) {
        {
            let results = on_ranks(world, config(Compression::None), move |communicator| {
                let mut buffer = input(communicator.rank(), length);
                communicator.all_reduce(&mut buffer, ReduceOp::Sum).unwrap();
                buffer
            });
            let inputs: Vec<Vec<f32>> = (0..world).map(|rank| input(rank, length)).collect();
            let expected: Vec<f32> = (0..length)
                .map(|index| inputs.iter().map(|values| values[index]).sum())
                .collect();
            for (rank, result) in results.iter().enumerate() {
                assert_eq!(result, &expected, "world {world}, length {length}, rank {rank}");
            }
        }
    }
}

#[test]
fn mean_and_bf16_compression_stay_within_tolerance_and_agree_across_ranks() {
    // 4099 elements take the inline path, 1,100,003 at 2 ranks (2 MiB bf16 segments) the sending thread.
    for (world, length) in [(2u32, 4099usize), (3, 4099), (4, 4099), (2, 1_100_003)] {
        let results = on_ranks(world, config(Compression::Bf16), move |communicator| {
            let mut buffer: Vec<f32> = (0..length)
                .map(|index| ((index as f32 * 0.37 + communicator.rank() as f32).sin()) * 3.0)
                .collect();
            communicator.all_reduce(&mut buffer, ReduceOp::Mean).unwrap();
            buffer
        });
        for (index, reduced) in results[0].iter().enumerate() {
            let exact: f32 = (0..world)
                .map(|rank| ((index as f32 * 0.37 + rank as f32).sin()) * 3.0)
                .sum::<f32>()
                / world as f32;
            // Each of the up to world-1 additions and the final rounding lose at most 2^-8 relative of
            // magnitudes up to 3 (the inputs' bound).
            let tolerance = 3.0 * (world as f32 + 1.0) / 256.0;
            assert!(
                (reduced - exact).abs() <= tolerance,
                "world {world} index {index}: {reduced} vs {exact}"
            );
        }
        assert!(
            results.iter().all(|result| result == &results[0]),
            "every rank ends with identical values"
        );
    }
}

#[test]
fn broadcast_all_gather_barrier_and_buckets() {
    let results = on_ranks(4, config(Compression::None), |communicator| {
        let rank = communicator.rank();
        let mut parameters = input(rank, 777);
        communicator.broadcast(&mut parameters, 2).unwrap();
        let mut gathered = vec![0.0; 3 * 4];
        communicator.all_gather(&[rank as f32; 3], &mut gathered).unwrap();
        communicator.barrier().unwrap();
        // Gradients of several sizes, reduced in buckets smaller than some of them.
        let mut first = vec![rank as f32; 10];
        let mut second = vec![1.0f32; 5000];
        let mut third = vec![2.0f32; 3];
        all_reduce_bucketed(
            communicator,
            &mut [&mut first, &mut second, &mut third],
            ReduceOp::Mean,
            1024,
        )
        .unwrap();
        (parameters, gathered, first, second, third)
    });
    for (parameters, gathered, first, second, third) in results {
        assert_eq!(parameters, input(2, 777));
        assert_eq!(gathered, [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0]);
        assert_eq!(first, vec![1.5; 10]);
        assert_eq!(second, vec![1.0; 5000]);
        assert_eq!(third, vec![2.0; 3]);
    }
}

#[test]
fn a_hung_peer_times_out_naming_it() {
    let (listener_zero, address_zero) = RingCommunicator::bind("127.0.0.1").unwrap();
    let (listener_one, address_one) = RingCommunicator::bind("127.0.0.1").unwrap();
    let addresses = vec![address_zero.to_string(), address_one.to_string()];
    let short = CollectiveConfig {
        timeout: Duration::from_millis(300),
        ..config(Compression::None)
    };
    let other = addresses.clone();
    let hung = std::thread::spawn(move || {
        // Joins the ring, then never takes part (as if SIGSTOPped).
        let communicator = RingCommunicator::connect(listener_one, 1, &other, 1, CollectiveConfig::default()).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        drop(communicator);
    });
    let mut communicator = RingCommunicator::connect(listener_zero, 0, &addresses, 1, short).unwrap();
    let started = Instant::now();
    let error = communicator
        .all_reduce(&mut vec![1.0; 1 << 20], ReduceOp::Sum)
        .unwrap_err();
    assert!(matches!(error, CollectiveError::Timeout { peer: 1, .. }), "{error}");
    assert!(error.to_string().contains("rank 1 did not answer"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the timeout, not the peer, ended it"
    );
    hung.join().unwrap();
}

#[test]
fn a_rank_of_another_attempt_is_refused() {
    let (listener_zero, address_zero) = RingCommunicator::bind("127.0.0.1").unwrap();
    let (listener_one, address_one) = RingCommunicator::bind("127.0.0.1").unwrap();
    let (stale_listener, stale_address) = RingCommunicator::bind("127.0.0.1").unwrap();
    let addresses = vec![address_zero.to_string(), address_one.to_string()];
    // A leftover rank 1 of attempt 1 reaches rank 0 of attempt 2 first; it must not join the ring.
    let stale = {
        let addresses = vec![address_zero.to_string(), stale_address.to_string()];
        std::thread::spawn(move || {
            let quick = CollectiveConfig {
                timeout: Duration::from_millis(500),
                ..CollectiveConfig::default()
            };
            RingCommunicator::connect(stale_listener, 1, &addresses, 1, quick).map(|_| ())
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let current = {
        let addresses = addresses.clone();
        std::thread::spawn(move || {
            let mut communicator =
                RingCommunicator::connect(listener_one, 1, &addresses, 2, CollectiveConfig::default()).unwrap();
            let mut buffer = vec![2.0f32; 10];
            communicator.all_reduce(&mut buffer, ReduceOp::Sum).unwrap();
            buffer
        })
    };
    let mut communicator =
        RingCommunicator::connect(listener_zero, 0, &addresses, 2, CollectiveConfig::default()).unwrap();
    let mut buffer = vec![1.0f32; 10];
    communicator.all_reduce(&mut buffer, ReduceOp::Sum).unwrap();
    assert_eq!(buffer, vec![3.0; 10]);
    assert_eq!(current.join().unwrap(), vec![3.0; 10]);
    assert!(stale.join().unwrap().is_err(), "the stale rank never formed a ring");
}
