"""Shared by the Spark peer scripts: the JVM's peak memory.

PySpark does not wait for its JVM, so the harness's getrusage(RUSAGE_CHILDREN) only sees the
Python driver; the scripts report the JVM's figure themselves and the harness adds it.
"""


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
