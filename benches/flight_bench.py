"""Helpers for benches/run-flight.sh: the table, the pyarrow.flight baseline server, the timed client and a
loopback TCP reference. Stock pyarrow only.

  flight_bench.py make ROWS OUT.arrow            int64 id, 8 float64 columns f0..f7, event_timestamp; IPC file
  flight_bench.py serve PORT FILE.arrow          pyarrow.flight server: every do_get streams the table's
                                                 id and f0..f7 (read into memory once)
  flight_bench.py fetch ADDRESS TICKET REPEATS   do_get TICKET (bytes, or @JSON for a Kiln command whose
                                                 ticket comes from get_flight_info) REPEATS times; prints JSON
  flight_bench.py loopback BYTES REPEATS         one TCP stream over 127.0.0.1, sendall/recv_into; prints JSON
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


def fetch(address, ticket, repeats):
    client = flight.connect(f"grpc://{address}")
    if ticket.startswith("@"):
        info = client.get_flight_info(flight.FlightDescriptor.for_command(ticket[1:].encode()))
        ticket = info.endpoints[0].ticket
    else:
        ticket = flight.Ticket(ticket.encode())
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


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "make":
        make(int(sys.argv[2]), sys.argv[3])
    elif mode == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    elif mode == "fetch":
        fetch(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif mode == "loopback":
        loopback(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(f"unknown mode {mode}")
