"""Shared by the Spark peer scripts: the lines every script reports, and the JVM's peak memory.

PySpark does not wait for its JVM, so the harness's getrusage(RUSAGE_CHILDREN) only sees the
Python driver; the scripts report the JVM's figure themselves and the harness adds it.
"""

import sys


def jvm_peak_rss_kib(sc):
    """The JVM's peak RSS (VmHWM) in KiB, or 0 if it cannot be read."""
    try:
        with open(f"/proc/{sc._gateway.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (AttributeError, OSError, ValueError):
        pass
    return 0


def report_and_stop(sc, **times_ms):
    """Prints `NAME_ms VALUE` for each timing (the harness parses these lines), the JVM's peak
    memory, and stops the context."""
    for name, value in times_ms.items():
        print(f"{name}_ms {value:.1f}")
    print(f"jvm_peak_rss_kib {jvm_peak_rss_kib(sc)}")
    sys.stdout.flush()
    sc.stop()
