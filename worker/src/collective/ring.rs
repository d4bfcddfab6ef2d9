//! The ring over TCP: one connection to the next rank (sending), one from the previous (receiving).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use kiln_kernels::{bf16, cpu};

use super::{CollectiveConfig, CollectiveError, Communicator, Compression, ReduceOp, Result};

/// Starts every connection: "KILN", the epoch (attempt), the sender's rank, the world size.
const MAGIC: [u8; 4] = *b"KILN";
const HANDSHAKE_BYTES: usize = 4 + 8 + 4 + 4;

pub struct RingCommunicator {
    rank: u32,
    world_size: u32,
    config: CollectiveConfig,
    /// To rank + 1; `None` for a group of one.
    next: Option<TcpStream>,
    /// From rank - 1.
    previous: Option<TcpStream>,
    /// Reused receive buffers, so a collective allocates nothing once warm.
    receive_bytes: Vec<u8>,
    receive_values: Vec<f32>,
    /// bf16 staging for chunks sent on the calling thread.
    send_wire: Vec<bf16>,
}

impl std::fmt::Debug for RingCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

fn io_error(peer: u32, operation: &'static str, timeout: Duration, error: std::io::Error) -> CollectiveError {
    match error.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => CollectiveError::Timeout {
            peer,
            operation,
            timeout,
        },
        _ => CollectiveError::Connection {
            peer,
            operation,
            message: error.to_string(),
        },
    }
}

/// Segment `index` of `count` equal-as-possible segments of `length` elements.
fn segment(length: usize, count: usize, index: usize) -> std::ops::Range<usize> {
    (length * index / count)..(length * (index + 1) / count)
}

/// `buffer[read]` to send and `buffer[write]` to receive into, at once; the ranges do not overlap.
fn split_pair(buffer: &mut [f32], read: std::ops::Range<usize>, write: std::ops::Range<usize>) -> (&[f32], &mut [f32]) {
    if read.start >= write.end {
        let (low, high) = buffer.split_at_mut(read.start);
        (&high[..read.len()], &mut low[write])
    } else {
        assert!(write.start >= read.end, "segments {read:?} and {write:?} overlap");
        let (low, high) = buffer.split_at_mut(write.start);
        (&low[read], &mut high[..write.len()])
    }
}

impl RingCommunicator {
    /// A listener for the ring on `host` (port chosen by the system) and the address to publish.
    pub fn bind(host: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
        let listener = TcpListener::bind((host, 0))?;
        let address = listener.local_addr()?;
        Ok((listener, address))
    }

    /// Joins the ring: `addresses` are every rank's published listener address, in rank order (from the
    /// rendezvous); `epoch` is the attempt, so a rank of another attempt is refused.
    pub fn connect(
        listener: TcpListener,
        rank: u32,
        addresses: &[String],
        epoch: u64,
        config: CollectiveConfig,
    ) -> Result<RingCommunicator> {
        let world_size = addresses.len() as u32;
        if rank >= world_size {
            return Err(CollectiveError::InvalidArgument(format!(
                "rank {rank} is outside a group of {world_size}"
            )));
        }
        let mut communicator = RingCommunicator {
            rank,
            world_size,
            config,
            next: None,
            previous: None,
            receive_bytes: Vec::new(),
            receive_values: Vec::new(),
            send_wire: Vec::new(),
        };
        if world_size == 1 {
            return Ok(communicator);
        }
        let timeout = communicator.config.timeout;
        let next_rank = (rank + 1) % world_size;
        let previous_rank = (rank + world_size - 1) % world_size;
        let deadline = Instant::now() + timeout;
        // Connect to the next rank (its listener exists: it was bound before the rendezvous).
        let next_address = &addresses[next_rank as usize];
        let mut next = loop {
            match TcpStream::connect(next_address) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(error) => return Err(io_error(next_rank, "connecting the ring", timeout, error)),
            }
        };
        configure(&next, timeout).map_err(|error| io_error(next_rank, "connecting the ring", timeout, error))?;
        let mut hello = Vec::with_capacity(HANDSHAKE_BYTES);
        hello.extend_from_slice(&MAGIC);
        hello.extend_from_slice(&epoch.to_le_bytes());
        hello.extend_from_slice(&rank.to_le_bytes());
        hello.extend_from_slice(&world_size.to_le_bytes());
        next.write_all(&hello)
            .map_err(|error| io_error(next_rank, "connecting the ring", timeout, error))?;
        // Accept the previous rank; anything else (a stale attempt, a stranger) is dropped.
        listener
            .set_nonblocking(true)
            .map_err(|error| io_error(previous_rank, "connecting the ring", timeout, error))?;
        let previous = loop {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .and_then(|()| configure(&stream, timeout))
                        .map_err(|error| io_error(previous_rank, "connecting the ring", timeout, error))?;
                    let mut received = [0u8; HANDSHAKE_BYTES];
                    if stream.read_exact(&mut received).is_err() || received[..4] != MAGIC {
                        continue;
                    }
                    let their_epoch = u64::from_le_bytes(received[4..12].try_into().expect("8 bytes"));
                    let their_rank = u32::from_le_bytes(received[12..16].try_into().expect("4 bytes"));
                    let their_world = u32::from_le_bytes(received[16..20].try_into().expect("4 bytes"));
                    if their_epoch != epoch || their_rank != previous_rank || their_world != world_size {
                        tracing::warn!(
                            their_epoch,
                            their_rank,
                            their_world,
                            epoch,
                            "refused a ring connection from another attempt or group"
                        );
                        continue;
                    }
                    break stream;
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(error) => return Err(io_error(previous_rank, "connecting the ring", timeout, error)),
            }
        };
        communicator.next = Some(next);
        communicator.previous = Some(previous);
        Ok(communicator)
    }

    fn next_rank(&self) -> u32 {
        (self.rank + 1) % self.world_size
    }

    fn previous_rank(&self) -> u32 {
        (self.rank + self.world_size - 1) % self.world_size
    }

    /// One ring step: sends `outgoing` to the next rank while receiving as many elements from the previous
    /// rank into `incoming`, combining each chunk as it arrives. Small segments (a trainer's gradients) go
    /// on this thread, alternating a write and a read of [`INLINE_CHUNK_BYTES`]; larger ones stream from a
    /// helper thread so that sending overlaps receiving and reducing.
    fn exchange(
        &mut self,
        outgoing: &[f32],
        incoming: &mut [f32],
        reduce: bool,
        compression: Compression,
        operation: &'static str,
    ) -> Result<()> {
        let timeout = self.config.timeout;
        let (next_rank, previous_rank) = (self.next_rank(), self.previous_rank());
        let next = self.next.as_mut().expect("a ring of two or more has a next rank");
        let previous = self
            .previous
            .as_mut()
            .expect("a ring of two or more has a previous rank");
        let receive_bytes = &mut self.receive_bytes;
        let receive_values = &mut self.receive_values;
        let send_error = |error| io_error(next_rank, operation, timeout, error);
        let receive_error = |error| io_error(previous_rank, operation, timeout, error);
        let wire_bytes = match compression {
            Compression::None => 4,
            Compression::Bf16 => 2,
        };
        if outgoing.len().max(incoming.len()) * wire_bytes <= INLINE_SEGMENT_BYTES_MAX {
            // Every rank writes at most one chunk before it reads one, and a chunk fits in the sockets'
            // buffers, so no write waits on a peer that is itself waiting to write.
            let chunk_elements = INLINE_CHUNK_BYTES / wire_bytes;
            let mut wire = std::mem::take(&mut self.send_wire);
            let (mut sends, mut receives) = (outgoing.chunks(chunk_elements), incoming.chunks_mut(chunk_elements));
            let result = loop {
                let (send, receive) = (sends.next(), receives.next());
                if send.is_none() && receive.is_none() {
                    break Ok(());
                }
                if let Some(chunk) = send
                    && let Err(error) = send_chunk(next, chunk, compression, &mut wire)
                {
                    break Err(send_error(error));
                }
                if let Some(chunk) = receive
                    && let Err(error) =
                        receive_chunk(previous, chunk, reduce, compression, receive_bytes, receive_values)
                {
                    break Err(receive_error(error));
                }
            };
            self.send_wire = wire;
            return result;
        }
        let chunk_elements = (self.config.chunk_bytes / 4).max(1);
        std::thread::scope(|scope| {
            let sender = scope.spawn(move || -> Result<()> {
                let mut wire: Vec<bf16> = Vec::new();
                for chunk in outgoing.chunks(chunk_elements) {
                    send_chunk(next, chunk, compression, &mut wire).map_err(send_error)?;
                }
                Ok(())
            });
            let received = incoming.chunks_mut(chunk_elements).try_for_each(|chunk| {
                receive_chunk(previous, chunk, reduce, compression, receive_bytes, receive_values)
                    .map_err(receive_error)
            });
            let sent = sender.join().unwrap_or_else(|_| {
                Err(CollectiveError::Connection {
                    peer: next_rank,
                    operation,
                    message: "the sending thread panicked".into(),
                })
            });
            received.and(sent)
        })
    }
}

/// Segments up to this many bytes on the wire are exchanged on the calling thread (no helper thread to
/// start and switch to, which costs more than it saves at this size).
const INLINE_SEGMENT_BYTES_MAX: usize = 1 << 20;
/// The chunk written before each read on that path: well under the 128 KiB a Linux socket buffers by
/// default, so a write never blocks on a peer that is busy writing too.
const INLINE_CHUNK_BYTES: usize = 32 << 10;

/// Writes one chunk to the next rank, as f32 or through `wire` as bf16.
fn send_chunk(
    next: &mut TcpStream,
    chunk: &[f32],
    compression: Compression,
    wire: &mut Vec<bf16>,
) -> std::io::Result<()> {
    match compression {
        Compression::None => next.write_all(bytemuck::cast_slice(chunk)),
        Compression::Bf16 => {
            wire.resize(chunk.len(), bf16::ZERO);
            cpu::to_bf16(chunk, wire).expect("equal lengths");
            next.write_all(bytemuck::cast_slice(wire.as_slice()))
        }
    }
}

/// Reads one chunk from the previous rank into `chunk`, adding it to what is there when `reduce`.
fn receive_chunk(
    previous: &mut TcpStream,
    chunk: &mut [f32],
    reduce: bool,
    compression: Compression,
    receive_bytes: &mut Vec<u8>,
    receive_values: &mut Vec<f32>,
) -> std::io::Result<()> {
    match (compression, reduce) {
        (Compression::None, false) => previous.read_exact(bytemuck::cast_slice_mut(chunk)),
        (Compression::None, true) => {
            receive_values.resize(chunk.len(), 0.0);
            previous.read_exact(bytemuck::cast_slice_mut(receive_values.as_mut_slice()))?;
            cpu::add_assign(chunk, receive_values).expect("equal lengths");
            Ok(())
        }
        (Compression::Bf16, _) => {
            receive_bytes.resize(chunk.len() * 2, 0);
            previous.read_exact(receive_bytes)?;
            let wire: &[bf16] = bytemuck::cast_slice(receive_bytes.as_slice());
            if reduce {
                cpu::add_assign_bf16(chunk, wire).expect("equal lengths");
            } else {
                cpu::to_f32(wire, chunk).expect("equal lengths");
            }
            Ok(())
        }
    }
}

fn configure(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

impl Communicator for RingCommunicator {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn world_size(&self) -> u32 {
        self.world_size
    }

    fn all_reduce(&mut self, buffer: &mut [f32], op: ReduceOp) -> Result<()> {
        let count = self.world_size as usize;
        if count > 1 && !buffer.is_empty() {
            let rank = self.rank as usize;
            let compression = self.config.compression;
            let length = buffer.len();
            for step in 0..count - 1 {
                let send = segment(length, count, (rank + count - step) % count);
                let receive = segment(length, count, (rank + 2 * count - step - 1) % count);
                let (outgoing, incoming) = split_pair(buffer, send, receive);
                self.exchange(outgoing, incoming, true, compression, "all-reduce")?;
            }
            // This rank now holds the full sum of segment rank + 1.
            let owned = segment(length, count, (rank + 1) % count);
            if op == ReduceOp::Mean {
                cpu::scale(&mut buffer[owned.clone()], 1.0 / count as f32);
            }
            if compression == Compression::Bf16 {
                // Every rank then holds exactly the bf16 values the others receive.
                let mut wire = vec![bf16::ZERO; owned.len()];
                cpu::to_bf16(&buffer[owned.clone()], &mut wire).expect("equal lengths");
                cpu::to_f32(&wire, &mut buffer[owned]).expect("equal lengths");
            }
            for step in 0..count - 1 {
                let send = segment(length, count, (rank + 1 + count - step) % count);
                let receive = segment(length, count, (rank + count - step) % count);
                let (outgoing, incoming) = split_pair(buffer, send, receive);
                self.exchange(outgoing, incoming, false, compression, "all-reduce")?;
            }
        }
        Ok(())
    }

    fn broadcast(&mut self, buffer: &mut [f32], root: u32) -> Result<()> {
        if root >= self.world_size {
            return Err(CollectiveError::InvalidArgument(format!(
                "broadcast root {root} is outside a group of {}",
                self.world_size
            )));
        }
        if self.world_size == 1 || buffer.is_empty() {
            return Ok(());
        }
        let timeout = self.config.timeout;
        let chunk_elements = (self.config.chunk_bytes / 4).max(1);
        let (next_rank, previous_rank) = (self.next_rank(), self.previous_rank());
        let forwards = next_rank != root;
        let next = self.next.as_mut().expect("a ring of two or more has a next rank");
        let previous = self
            .previous
            .as_mut()
            .expect("a ring of two or more has a previous rank");
        // Pipelined along the ring: each chunk is passed on as soon as it has arrived.
        for chunk in buffer.chunks_mut(chunk_elements) {
            if self.rank != root {
                previous
                    .read_exact(bytemuck::cast_slice_mut(chunk))
                    .map_err(|error| io_error(previous_rank, "broadcast", timeout, error))?;
            }
            if forwards {
                next.write_all(bytemuck::cast_slice(chunk))
                    .map_err(|error| io_error(next_rank, "broadcast", timeout, error))?;
            }
        }
        Ok(())
    }

    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<()> {
        let count = self.world_size as usize;
        if output.len() != input.len() * count {
            return Err(CollectiveError::InvalidArgument(format!(
                "all-gather output has {} elements; expected {} ({} per rank × {count} ranks)",
                output.len(),
                input.len() * count,
                input.len()
            )));
        }
        let rank = self.rank as usize;
        let piece = input.len();
        output[rank * piece..(rank + 1) * piece].copy_from_slice(input);
        if count == 1 || piece == 0 {
            return Ok(());
        }
        for step in 0..count - 1 {
            let send = (rank + count - step) % count;
            let receive = (rank + 2 * count - step - 1) % count;
            let (outgoing, incoming) = split_pair(
                output,
                send * piece..(send + 1) * piece,
                receive * piece..(receive + 1) * piece,
            );
            self.exchange(outgoing, incoming, false, Compression::None, "all-gather")?;
        }
        Ok(())
    }
}
