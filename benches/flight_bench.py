"""Helpers for benches/run-flight.sh: the table, the pyarrow.flight baseline server, the timed client and a
loopback TCP reference. Stock pyarrow only.

  flight_bench.py make ROWS OUT.arrow            int64 id, 8 float64 columns f0..f7, event_timestamp; IPC file
  flight_bench.py serve PORT FILE.arrow          pyarrow.flight server: every do_get streams the table's
                                                 id and f0..f7 (read into memory once)
  flight_bench.py fetch ADDRESS TICKET REPEATS [WARMUP]
                                                 do_get TICKET (bytes, or @JSON for a Kiln command whose
                                                 ticket comes from get_flight_info) WARMUP times untimed
                                                 (default 0), then REPEATS times timed, on one connection;
                                                 prints JSON
  flight_bench.py loopback BYTES REPEATS         one TCP stream over 127.0.0.1, sendall/recv_into; prints JSON
  flight_bench.py make-lookup ROWS OUT.arrow     int64 id, event_timestamp, 10 float64 features g0..g9
  flight_bench.py lookup ADDRESS SERVICE ROWS COUNT
                                                 COUNT sequential online lookups of one random id each (one
                                                 DoGet whose ticket is the command); prints p50/p99 in ms
"""

import json
import socket
import statistics
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

COLUMNS = ["id"] + [f"f{i}" for i in range(8)]
BATCH_ROWS = 65536


def make(rows, out):
    generator = np.random.default_rng(42)
    schema = pa.schema(
        [("id", pa.int64())]
        + [(f"f{i}", pa.float64()) for i in range(8)]
        + [("event_timestamp", pa.timestamp("us"))]
    )
    with pa.OSFile(out, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, rows, BATCH_ROWS):
            count = min(BATCH_ROWS, rows - start)
            arrays = [pa.array(np.arange(start, start + count, dtype=np.int64))]
            arrays += [pa.array(generator.random(count)) for _ in range(8)]
            arrays.append(pa.array(np.full(count, 1_762_000_000_000_000, dtype=np.int64), pa.timestamp("us")))
            writer.write_batch(pa.record_batch(arrays, schema=schema))


class Baseline(flight.FlightServerBase):
    def __init__(self, location, table):
        super().__init__(location)
        self.table = table

    def do_get(self, context, ticket):
        return flight.RecordBatchStream(self.table)


def serve(port, path):
    with pa.memory_map(path) as source:
        table = pa.ipc.open_file(source).read_all().select(COLUMNS)
    # Off the memory map: the baseline serves from memory.
    table = pa.concat_tables([table]).combine_chunks().to_batches(max_chunksize=BATCH_ROWS)
    table = pa.Table.from_batches(table)
    server = Baseline(f"grpc://127.0.0.1:{port}", table)
    print("serving", flush=True)
    server.serve()


def fetch(address, ticket, repeats, warmup=0):
    client = flight.connect(f"grpc://{address}")
    if ticket.startswith("@"):
        info = client.get_flight_info(flight.FlightDescriptor.for_command(ticket[1:].encode()))
        ticket = info.endpoints[0].ticket
    else:
        ticket = flight.Ticket(ticket.encode())
    # pyarrow's client is slow on its first DoGets of a connection, whichever server it reads.
    for _ in range(warmup):
        client.do_get(ticket).read_all()
    rates, nbytes, rows = [], 0, 0
    for _ in range(repeats):
        started = time.perf_counter()
        table = client.do_get(ticket).read_all()
        seconds = time.perf_counter() - started
        nbytes, rows = table.nbytes, table.num_rows
        rates.append(nbytes / seconds / 1e9)
        del table
    print(json.dumps({"rows": rows, "bytes": nbytes, "gb_per_s": rates, "median_gb_per_s": statistics.median(rates)}))


def loopback(total, repeats):
    rates = []
    chunk = 1 << 20
    for _ in range(repeats):
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]

        def receive():
            connection, _ = listener.accept()
            buffer = bytearray(chunk)
            view = memoryview(buffer)
            left = total
            while left:
                left -= connection.recv_into(view, min(chunk, left))
            connection.close()

        receiver = threading.Thread(target=receive)
        receiver.start()
        sender = socket.create_connection(("127.0.0.1", port))
        payload = bytes(chunk)
        started = time.perf_counter()
        sent = 0
        while sent < total:
            sender.sendall(payload[: min(chunk, total - sent)])
            sent += min(chunk, total - sent)
        sender.close()
        receiver.join()
        rates.append(total / (time.perf_counter() - started) / 1e9)
        listener.close()
    print(json.dumps({"bytes": total, "gb_per_s": rates, "median_gb_per_s": statistics.median(rates)}))


def make_lookup(rows, out):
    generator = np.random.default_rng(7)
    schema = pa.schema(
        [("id", pa.int64()), ("event_timestamp", pa.timestamp("us"))] + [(f"g{i}", pa.float64()) for i in range(10)]
    )
    arrays = [
        pa.array(np.arange(rows, dtype=np.int64)),
        pa.array(np.full(rows, 1_762_000_000_000_000, dtype=np.int64), pa.timestamp("us")),
    ] + [pa.array(generator.random(rows)) for _ in range(10)]
    with pa.OSFile(out, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(pa.table(arrays, schema=schema), max_chunksize=BATCH_ROWS)


def lookup(address, service, rows, count):
    client = flight.connect(f"grpc://{address}")
    generator = np.random.default_rng(11)
    latencies = []
    for index in range(count + 100):
        key = int(generator.integers(0, rows))
        ticket = flight.Ticket(json.dumps({"online": {"service": service, "entities": {"id": [key]}}}).encode())
        started = time.perf_counter()
        table = client.do_get(ticket).read_all()
        elapsed = time.perf_counter() - started
        assert table.num_rows == 1 and table.column("g0")[0].as_py() is not None, table
        if index >= 100:  # the first 100 warm the connection up
            latencies.append(elapsed * 1e3)
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    print(json.dumps({"lookups": count, "p50_ms": pick(0.50), "p99_ms": pick(0.99), "max_ms": latencies[-1]}))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "make":
        make(int(sys.argv[2]), sys.argv[3])
    elif mode == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    elif mode == "fetch":
        fetch(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 0)
    elif mode == "make-lookup":
        make_lookup(int(sys.argv[2]), sys.argv[3])
    elif mode == "lookup":
        lookup(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif mode == "loopback":
        loopback(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(f"unknown mode {mode}")
