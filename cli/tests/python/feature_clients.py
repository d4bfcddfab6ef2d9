"""Kiln's feature server through stock clients only: pyarrow.flight, adbc_driver_flightsql, and Python's own
HTTP client for the Feast-shaped JSON endpoints on the same port.

Usage: feature_clients.py HOST:PORT ENTITIES_CSV  (the example definitions applied, nothing materialized)
"""

import json
import sys
import urllib.error
import urllib.request

import adbc_driver_flightsql.dbapi as dbapi
import pyarrow as pa
import pyarrow.flight as flight

address, entities = sys.argv[1], sys.argv[2]
client = flight.connect(f"grpc://{address}")


def command(value):
    return flight.FlightDescriptor.for_command(json.dumps(value).encode())


def read(descriptor):
    info = client.get_flight_info(descriptor)
    return pa.concat_tables(client.do_get(endpoint.ticket).read_all() for endpoint in info.endpoints)


# ListFlights: every view and service.
listed = {tuple(part.decode() for part in info.descriptor.path) for info in client.list_flights()}
for expected in [("view", "driver_hourly_stats"), ("view", "driver_live_stats"), ("service", "driver_activity")]:
    assert expected in listed, listed

# A view by path, and a training set by command: point in time, the third entity before any row.
view = read(flight.FlightDescriptor.for_path("view", "driver_hourly_stats"))
assert view.num_rows == 5 * 48, view.num_rows
training = read(command({"training_set": {"service": "driver_activity", "entities": entities}}))
assert training.num_rows == 3, training
conv = training.column("conv_rate").to_pylist()
assert conv[0] is not None and conv[1] is not None and conv[2] is None, conv

# DoPut into the push source, acknowledged with the row count; then read online and offline.
schema = pa.schema([("driver_id", pa.int64()), ("event_timestamp", pa.timestamp("us")), ("trips_today", pa.int64())])
rows = pa.table(
    {
        "driver_id": [1001, 1002],
        "event_timestamp": pa.array([1_762_000_000_000_000, 1_762_000_000_000_000], pa.timestamp("us")),
        "trips_today": [7, 3],
    },
    schema=schema,
)
writer, reader = client.do_put(flight.FlightDescriptor.for_path("push", "driver_live"), schema)
writer.write_table(rows)
writer.done_writing()
acknowledgement = json.loads(reader.read().to_pybytes())
writer.close()
assert acknowledgement["rows"] == 2, acknowledgement
online = read(command({"online": {"service": "driver_live", "entities": {"driver_id": [1001, 1002, 9999]}}}))
assert online.column("trips_today").to_pylist() == [7, 3, None], online
assert read(flight.FlightDescriptor.for_path("view", "driver_live_stats")).num_rows == 2

# Errors name the problem.
for descriptor, expected in [
    (flight.FlightDescriptor.for_path("view", "nope"), "feature view 'nope' is not defined"),
    (command({"online": {"service": "driver_live", "entities": {"driver_id": [1.5]}}}), "expected an integer or a string"),
    (flight.FlightDescriptor.for_command(b"garbage"), "is not a Kiln feature command"),
]:
    try:
        client.get_flight_info(descriptor)
    except pa.ArrowException as error:
        assert expected in str(error), str(error)
    else:
        raise AssertionError(f"{descriptor} was accepted")



# The same port answers Feast's feature-server JSON over HTTP/1.1: a lookup, a push, an error.
def post(path, body):
    request = urllib.request.Request(
        f"http://{address}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


status, answer = post("/get-online-features", {"feature_service": "driver_live", "entities": {"driver_id": [1002, 9999]}})
assert status == 200, answer
assert answer["metadata"]["feature_names"] == ["driver_id", "trips_today"], answer
assert answer["results"][1]["values"] == [3, None], answer
assert answer["results"][1]["statuses"] == ["PRESENT", "NOT_FOUND"], answer
status, answer = post(
    "/push",
    {
        "push_source_name": "driver_live",
        "df": {"driver_id": [1002], "event_timestamp": ["2025-11-02T12:00:00Z"], "trips_today": [4]},
        "to": "online_and_offline",
    },
)
assert (status, answer["rows"]) == (200, 1), answer
status, answer = post("/get-online-features", {"features": ["driver_live_stats:trips_today"], "entities": {"driver_id": [1002]}})
assert answer["results"][1]["values"] == [4], answer
status, answer = post("/get-online-features", {"feature_service": "nope", "entities": {"driver_id": [1]}})
assert status == 400 and "feature service 'nope' is not defined" in answer["error"], answer

# Flight SQL through ADBC: a query, the tables and a table's schema.
with dbapi.connect(f"grpc://{address}") as connection:
    cursor = connection.cursor()
    cursor.execute("SELECT driver_id, avg(conv_rate) AS conv FROM driver_hourly_stats GROUP BY 1 ORDER BY 1")
    result = cursor.fetchall()
    assert [row[0] for row in result] == [1001, 1002, 1003, 1004, 1005], result
    cursor.execute("SELECT count(*) AS n FROM driver_live_stats")
    assert cursor.fetchone()[0] == 3
    objects = connection.adbc_get_objects(depth="tables").read_all().to_pylist()
    tables = {
        table["table_name"]
        for catalog in objects
        for schema in catalog["catalog_db_schemas"] or []
        for table in schema["db_schema_tables"] or []
    }
    assert {"driver_hourly_stats", "driver_live_stats"} <= tables, objects
    columns = connection.adbc_get_table_schema("driver_hourly_stats", catalog_filter="kiln", db_schema_filter="features")
    assert "conv_rate" in columns.names, columns
    assert "TABLE" in connection.adbc_get_table_types()
    # Bulk ingestion (ADBC's adbc_ingest) appends to a push source like a DoPut: offline and online.
    more = pa.table(
        {
            "driver_id": [1005],
            "event_timestamp": pa.array([1_762_000_000_000_000], pa.timestamp("us")),
            "trips_today": [11],
        },
        schema=schema,
    )
    assert cursor.adbc_ingest("driver_live", more, mode="append") == 1
    cursor.execute("SELECT count(*) AS n FROM driver_live_stats")
    assert cursor.fetchone()[0] == 4
    online = read(command({"online": {"service": "driver_live", "entities": {"driver_id": [1005]}}}))
    assert online.column("trips_today").to_pylist() == [11], online
    for mode, expected in [("create", "must append"), ("replace", "must append")]:
        try:
            cursor.adbc_ingest("driver_live", more, mode=mode)
        except dbapi.Error as error:
            assert expected in str(error), str(error)
        else:
            raise AssertionError(f"ingestion with mode {mode} was accepted")
    try:
        cursor.adbc_ingest("driver_hourly", more, mode="append")
    except dbapi.Error as error:
        assert "reads a file, not pushes" in str(error), str(error)
    else:
        raise AssertionError("ingestion into a file source was accepted")
    cursor.execute("SELECT count(*) AS n FROM driver_live_stats")
    assert cursor.fetchone()[0] == 4, "a refused ingestion changed nothing"
    try:
        cursor.execute("SELECT nope FROM driver_hourly_stats")
    except dbapi.Error as error:
        assert "nope" in str(error), str(error)
    else:
        raise AssertionError("a bad query was accepted")
    cursor.close()

print("all stock-client checks passed")
