"""SQL statements over Flight SQL with the stock client (adbc-driver-flightsql), for benches/ab-sql.sh.

    sql_bench.py ADDRESS COUNT

Runs each statement once untimed, then COUNT times, against the tables of run-feast.sh (`hourly`, `lookup`),
and prints one JSON object: per statement, the median and the fastest time in milliseconds.
"""

import json
import statistics
import sys
import time

import adbc_driver_flightsql.dbapi as dbapi

STATEMENTS = {
    # Little to plan or run: the round trip.
    "count": "SELECT count(*) FROM lookup",
    # An aggregation over 1,000,000 rows.
    "group": "SELECT id % 100 AS bucket, avg(f0), max(f1), min(f2) FROM hourly WHERE f3 > 0.5 "
    "GROUP BY 1 ORDER BY 2 DESC LIMIT 5",
    # A hash join of the two tables.
    "join": "SELECT h.id, sum(h.f0 * l.g0) AS s FROM hourly h JOIN lookup l ON h.id = l.id WHERE l.g1 < 0.1 "
    "GROUP BY h.id ORDER BY s DESC LIMIT 10",
    # Ten rows out, many expressions to plan: the planner's share.
    "plan": "SELECT id, CASE WHEN g0 > 0.5 THEN 'hi' ELSE 'lo' END AS c, coalesce(g1, 0) + abs(g2) * 2 AS x, "
    "upper(concat('k', CAST(id AS VARCHAR))) AS k FROM lookup "
    "WHERE id IN (1, 2, 3, 4, 5, 6, 7, 8, 9, 10) AND g3 BETWEEN 0.1 AND 0.9 ORDER BY id",
}


def main():
    address, count = sys.argv[1], int(sys.argv[2])
    connection = dbapi.connect(f"grpc://{address}")
    summary = {}
    for name, statement in STATEMENTS.items():
        cursor = connection.cursor()
        cursor.execute(statement)
        cursor.fetch_arrow_table()
        seconds = []
        for _ in range(count):
            started = time.perf_counter()
            cursor.execute(statement)
            cursor.fetch_arrow_table()
            seconds.append(time.perf_counter() - started)
        cursor.close()
        summary[name] = {"median_ms": statistics.median(seconds) * 1e3, "min_ms": min(seconds) * 1e3}
    connection.close()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
