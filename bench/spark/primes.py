"""Apache Spark peer of examples/primes.dasm: count the primes below M by trial division.

Usage: primes.py M MASTER        e.g. primes.py 2000000 local[2]

The same algorithm as DVM and bench/native/primes.c: 2 is prime; an odd n >= 3 is prime when no
odd d >= 3 with d*d <= n divides it. The odd candidates are split into contiguous
ranges, 4 per core, counted in Python workers (PySpark RDD API), and summed.

Prints `primes COUNT`, then `jvm_start_ms T` (JVM + SparkContext) `job_ms T` (the count) and
`jvm_peak_rss_kib R` (the JVM's VmHWM).
"""

import os
import sys
import time

from sparkcommon import report_and_stop


def count_range(bounds):
    lo, hi = bounds
    count = 0
    n = lo if lo % 2 == 1 else lo + 1
    while n < hi:
        if n >= 3:
            d = 3
            prime = True
            while d * d <= n:
                if n % d == 0:
                    prime = False
                    break
                d += 2
            if prime:
                count += 1
        n += 2
    yield count


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    m = int(sys.argv[1])
    master = sys.argv[2]

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    t0 = time.perf_counter()
    from pyspark import SparkConf, SparkContext

    conf = SparkConf().setMaster(master).setAppName("dvm-bench-primes").set("spark.ui.enabled", "false")
    sc = SparkContext(conf=conf)
    sc.setLogLevel("WARN")
    jvm_start_ms = (time.perf_counter() - t0) * 1e3

    t1 = time.perf_counter()
    parts = max(1, sc.defaultParallelism * 4)
    # Later ranges cost more (sqrt(n) divisions per prime); equal-width ranges, several per core,
    # let Spark's scheduler balance them.
    step = -(-m // parts)
    ranges = [(i * step, min(m, (i + 1) * step)) for i in range(parts) if i * step < m]
    count = sc.parallelize(ranges, len(ranges)).mapPartitions(
        lambda it: (c for r in it for c in count_range(r))
    ).sum()
    if m > 2:
        count += 1  # the prime 2
    job_ms = (time.perf_counter() - t1) * 1e3

    print(f"primes {count}")
    report_and_stop(sc, jvm_start=jvm_start_ms, job=job_ms)


if __name__ == "__main__":
    main()
