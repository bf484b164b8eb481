"""Apache Spark peer of examples/kmeans.dasm (the DVM benchmark's k-means).

Usage: kmeans.py PATH N D K I MASTER      e.g. kmeans.py points.f64 1000000 8 16 10 local[2]

Reads the raw little-endian f64 file (N*D, row-major) with numpy, and runs MLlib's KMeans
(pyspark.mllib, the RDD API: the only Python API that takes an initial model) with the initial
model = the first K points, maxIterations = I and epsilon = 0, on `MASTER`.

Prints, one per line:
  checksum X          the sum of all final centroid coordinates, 6 decimals (as DVM and C)
  jvm_start_ms T      launching the JVM and creating the SparkContext
  load_ms T           moving the points into the JVM (pickled from Python) and caching them
  job_ms T            KMeans training on the cached data (what the harness compares)
  jvm_peak_rss_kib R  the JVM's peak RSS (VmHWM)
MLlib's own INFO line "KMeans reached the max number of iterations: I." (or "KMeans converged in
N iterations.") goes to stderr; the harness reads the number of iterations from there.

Semantics versus DVM/C: MLlib runs `while (iteration < maxIterations && !converged)`; with
epsilon = 0 it stops early only when no centre moved at all (an exact fixed point, after which
further Lloyd iterations change nothing, so the result equals I iterations). Distances are squared
Euclidean computed as |a|^2 + |b|^2 - 2a.b when that is precise enough (rounding may differ from
the direct sum in the last bits; a near-tie can in principle go the other way); ties go to the
lowest index (strict <); an empty cluster keeps its centre.
"""

import os
import sys
import time

from sparkcommon import report_and_stop


def main():
    if len(sys.argv) != 7:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    path = sys.argv[1]
    n, d, k, iters = (int(a) for a in sys.argv[2:6])
    master = sys.argv[6]

    import numpy as np

    points = np.fromfile(path, dtype="<f8", count=n * d)
    if points.size != n * d:
        sys.exit(f"kmeans.py: {path} holds {points.size} values, expected {n * d}")
    points = points.reshape(n, d)

    # Python workers must use this interpreter (the venv with numpy), not whatever `python3` is.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    t0 = time.perf_counter()
    from pyspark import SparkConf, SparkContext

    conf = (
        SparkConf()
        .setMaster(master)
        .setAppName("dvm-bench-kmeans")
        .set("spark.ui.enabled", "false")
        .set("spark.driver.memory", os.environ.get("SPARK_DRIVER_MEMORY", "4g"))
    )
    sc = SparkContext(conf=conf)
    sc.setLogLevel("WARN")
    jvm = sc._jvm
    # MLlib's own "KMeans converged in N iterations" / "reached the max number of iterations"
    # line is at INFO: let that one logger through so the iteration count can be checked.
    jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(
        "org.apache.spark.mllib.clustering.KMeans", jvm.org.apache.logging.log4j.Level.INFO
    )
    jvm_start_ms = (time.perf_counter() - t0) * 1e3

    from pyspark.mllib.common import _to_java_object_rdd, callMLlibFunc
    from pyspark.mllib.linalg import DenseVector

    # Move the points into the JVM once, as a cached JavaRDD[Vector], so that the job time below
    # is the clustering only (pickling 10^6 rows from Python is not Spark's k-means).
    t1 = time.perf_counter()
    slices = sc.defaultParallelism
    chunks = np.array_split(points, slices)
    rdd = sc.parallelize(chunks, slices).flatMap(lambda c: [DenseVector(r) for r in c])
    jrdd = _to_java_object_rdd(rdd)
    jrdd.persist(jvm.org.apache.spark.storage.StorageLevel.MEMORY_AND_DISK())
    jrdd.count()
    load_ms = (time.perf_counter() - t1) * 1e3

    initial = [DenseVector(points[j]) for j in range(k)]
    t2 = time.perf_counter()
    # KMeans.train(rdd, ...) would re-pickle the Python RDD; this is the same MLlib entry point
    # (PythonMLLibAPI.trainKMeansModel) given the already-converted JavaRDD.
    model = callMLlibFunc(
        "trainKMeansModel", jrdd, k, iters, "random", None, 2, 0.0, initial, "euclidean"
    )
    centers = [c.toArray() for c in model.clusterCenters()]
    job_ms = (time.perf_counter() - t2) * 1e3

    checksum = float(sum(float(x) for c in centers for x in c))
    print(f"checksum {checksum:.6f}")
    report_and_stop(sc, jvm_start=jvm_start_ms, load=load_ms, job=job_ms)


if __name__ == "__main__":
    main()
