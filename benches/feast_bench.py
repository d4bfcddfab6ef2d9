"""Feast against Kiln's feature store on the same files, driven by benches/run-feast.sh.

Modes:
  make DIR ENTITY_ROWS DRIVERS HOURS LOOKUP_ROWS
      DIR/hourly.parquet    DRIVERS x HOURS hourly rows (id, event_timestamp, f0..f3 float64), shuffled
      DIR/entities.parquet  ENTITY_ROWS (id, event_timestamp) rows at random drivers and times
      DIR/lookup.parquet    LOOKUP_ROWS entities with one row each (id, event_timestamp, g0..g9 float64)
  feast-historical DIR REPEATS        Feast's get_historical_features(...).to_arrow(), its default offline store
  feast-online DIR ROWS LOOKUPS       Feast's get_online_features for one entity, 10 features, SQLite online store
  kiln-historical ADDRESS DIR REPEATS Kiln's training set over Flight (DoGet of the training_set command)
  http ADDRESS ROWS LOOKUPS           POST /get-online-features (the 10 features of view `lookup`, one entity)
                                      on one keep-alive connection: Kiln's feature server or Feast's
  feast-serve DIR PORT                Feast's HTTP feature server (`feast serve`) over the SQLite online
                                      store that feast-online filled; runs until killed

Each prints one JSON line. The historical modes also print how many f0 values the join found, so the two
sides can be checked against each other.
"""

import contextlib
import datetime
import http.client
import json
import os
import statistics
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

START = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
START_MICROS = int(START.timestamp() * 1_000_000)
HOUR_MICROS = 3_600_000_000
WARMUP = 100


def make(directory, entity_rows, drivers, hours, lookup_rows):
    generator = np.random.default_rng(7)
    os.makedirs(directory, exist_ok=True)
    ids = np.repeat(np.arange(drivers, dtype=np.int64), hours)
    times = START_MICROS + np.tile(np.arange(hours, dtype=np.int64), drivers) * HOUR_MICROS
    order = generator.permutation(len(ids))
    columns = {"id": ids[order], "event_timestamp": pa.array(times[order], pa.timestamp("us", tz="UTC"))}
    for index in range(4):
        columns[f"f{index}"] = generator.random(len(ids))
    pq.write_table(pa.table(columns), f"{directory}/hourly.parquet")
    # Entity times run a day past the last row, so some fall outside the 1-day TTL.
    span = (hours + 24) * HOUR_MICROS
    entities = {
        "id": generator.integers(0, drivers, entity_rows, dtype=np.int64),
        "event_timestamp": pa.array(
            START_MICROS + generator.integers(0, span, entity_rows, dtype=np.int64), pa.timestamp("us", tz="UTC")
        ),
    }
    pq.write_table(pa.table(entities), f"{directory}/entities.parquet")
    lookup = {
        "id": np.arange(lookup_rows, dtype=np.int64),
        "event_timestamp": pa.array(np.full(lookup_rows, START_MICROS, dtype=np.int64), pa.timestamp("us", tz="UTC")),
    }
    for index in range(10):
        lookup[f"g{index}"] = generator.random(lookup_rows)
    pq.write_table(pa.table(lookup), f"{directory}/lookup.parquet")


def feast_store(directory):
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource
    from feast.infra.online_stores.sqlite import SqliteOnlineStoreConfig
    from feast.repo_config import RepoConfig
    from feast.types import Float64

    repo = f"{directory}/feast"
    os.makedirs(repo, exist_ok=True)
    config = RepoConfig(
        project="bench",
        registry=f"{repo}/registry.db",
        provider="local",
        online_store=SqliteOnlineStoreConfig(path=f"{repo}/online.db"),
        entity_key_serialization_version=3,
        repo_path=repo,
    )
    # The same settings as a file, for `feast serve`.
    with open(f"{repo}/feature_store.yaml", "w") as file:
        file.write(
            f"project: bench\nregistry: {repo}/registry.db\nprovider: local\n"
            f"online_store:\n  type: sqlite\n  path: {repo}/online.db\nentity_key_serialization_version: 3\n"
        )
    store = FeatureStore(config=config)
    row = Entity(name="row", join_keys=["id"])
    hourly = FeatureView(
        name="hourly",
        entities=[row],
        ttl=datetime.timedelta(days=1),
        schema=[Field(name=f"f{index}", dtype=Float64) for index in range(4)],
        source=FileSource(path=f"{directory}/hourly.parquet", timestamp_field="event_timestamp"),
    )
    lookup = FeatureView(
        name="lookup",
        entities=[row],
        ttl=datetime.timedelta(days=3650),
        schema=[Field(name=f"g{index}", dtype=Float64) for index in range(10)],
        source=FileSource(path=f"{directory}/lookup.parquet", timestamp_field="event_timestamp"),
    )
    store.apply([row, hourly, lookup])
    return store


def timed(repeats, run):
    seconds = []
    result = None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - started)
    return seconds, result


def found(table):
    return table.num_rows, table.num_rows - table.column("f0").null_count


def feast_historical(directory, repeats):
    import pandas as pd

    store = feast_store(directory)
    entities = pd.read_parquet(f"{directory}/entities.parquet")
    features = [f"hourly:f{index}" for index in range(4)]
    seconds, table = timed(repeats, lambda: store.get_historical_features(entity_df=entities, features=features).to_arrow())
    rows, non_null = found(table)
    print(json.dumps({"seconds": seconds, "median_s": statistics.median(seconds), "rows": rows, "f0_found": non_null}))


def latencies_summary(latencies):
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    return {"lookups": len(latencies), "p50_ms": pick(0.50), "p99_ms": pick(0.99), "max_ms": latencies[-1]}


def feast_online(directory, rows, count):
    store = feast_store(directory)
    started = time.perf_counter()
    # Feast prints its progress on stdout, where this script's JSON goes.
    with contextlib.redirect_stdout(sys.stderr):
        store.materialize(
            START - datetime.timedelta(days=1), START + datetime.timedelta(days=1), feature_views=["lookup"]
        )
    materialize_s = time.perf_counter() - started
    features = [f"lookup:g{index}" for index in range(10)]
    generator = np.random.default_rng(11)
    latencies = []
    for index in range(count + WARMUP):
        key = int(generator.integers(0, rows))
        started = time.perf_counter()
        answer = store.get_online_features(features=features, entity_rows=[{"id": key}]).to_dict()
        elapsed = time.perf_counter() - started
        assert answer["g0"][0] is not None, answer
        if index >= WARMUP:
            latencies.append(elapsed * 1e3)
    print(json.dumps({**latencies_summary(latencies), "materialize_s": materialize_s}))


def kiln_historical(address, directory, repeats):
    import pyarrow.flight as flight

    client = flight.connect(f"grpc://{address}")
    command = {"training_set": {"service": "hourly_service", "entities": f"{directory}/entities.parquet"}}
    ticket = flight.Ticket(json.dumps(command).encode())
    entities = f"{directory}/entities.parquet"

    def join():
        # The server keeps a computed set for a minute, keyed by the entity file's modification time:
        # touching the file makes every repeat a full join.
        os.utime(entities)
        return client.do_get(ticket).read_all()

    seconds, table = timed(repeats, join)
    rows, non_null = found(table)
    print(json.dumps({"seconds": seconds, "median_s": statistics.median(seconds), "rows": rows, "f0_found": non_null}))


def http_lookups(address, rows, count):
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    features = [f"lookup:g{index}" for index in range(10)]
    generator = np.random.default_rng(11)
    latencies = []
    for index in range(count + WARMUP):
        key = int(generator.integers(0, rows))
        body = json.dumps({"features": features, "entities": {"id": [key]}})
        started = time.perf_counter()
        connection.request("POST", "/get-online-features", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        elapsed = time.perf_counter() - started
        assert response.status == 200, answer
        values = {name: result["values"][0] for name, result in zip(answer["metadata"]["feature_names"], answer["results"])}
        assert values["g0"] is not None and values["id"] == key, answer
        if index >= WARMUP:
            latencies.append(elapsed * 1e3)
    print(json.dumps(latencies_summary(latencies)))


def feast_serve(directory, port):
    feast_store(directory)
    os.execv(
        os.path.join(os.path.dirname(sys.executable), "feast"),
        ["feast", "-c", f"{directory}/feast", "serve", "-h", "127.0.0.1", "-p", str(port), "--no-access-log"],
    )


if __name__ == "__main__":
    mode, arguments = sys.argv[1], sys.argv[2:]
    if mode == "make":
        make(arguments[0], *map(int, arguments[1:5]))
    elif mode == "feast-historical":
        feast_historical(arguments[0], int(arguments[1]))
    elif mode == "feast-online":
        feast_online(arguments[0], int(arguments[1]), int(arguments[2]))
    elif mode == "kiln-historical":
        kiln_historical(arguments[0], arguments[1], int(arguments[2]))
    elif mode == "http":
        http_lookups(arguments[0], int(arguments[1]), int(arguments[2]))
    elif mode == "feast-serve":
        feast_serve(arguments[0], int(arguments[1]))
    else:
        sys.exit(f"unknown mode {mode}")
