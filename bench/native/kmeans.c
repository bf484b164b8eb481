/* Native k-means baseline for the DVM benchmark (see BENCHMARKS.md).
 *
 * Usage: kmeans PATH N D K I [PRINT_TIMING]
 * PATH holds N*D little-endian f64, row-major, no header. Lloyd's algorithm exactly as
 * examples/kmeans.dasm: initial centroids = the first K points; exactly I iterations; squared
 * Euclidean distance; strict `<` (ties go to the lowest index); an empty cluster keeps its
 * centroid. Prints optional `iteration i: T ms` lines, then `checksum X` (the sum of all final
 * centroid coordinates, 6 decimals).
 *
 * Built twice by the harness from this one source: `gcc -O2` (single thread; the pragmas are
 * ignored) and `gcc -O2 -fopenmp` (all cores). Each thread accumulates into its own sums, merged
 * in thread order, so the OpenMP result can differ from the serial one in the last bits only.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s PATH N D K I [PRINT_TIMING]\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    long n = atol(argv[2]), d = atol(argv[3]), k = atol(argv[4]), iters = atol(argv[5]);
    int print_timing = argc > 6 ? atoi(argv[6]) : 0;
    if (n <= 0 || d <= 0 || k <= 0 || k > n || iters < 0) {
        fprintf(stderr, "kmeans: bad sizes\n");
        return 2;
    }
    double *x = malloc(sizeof(double) * n * d);
    double *c = malloc(sizeof(double) * k * d);
    if (!x || !c) {
        fprintf(stderr, "kmeans: out of memory\n");
        return 1;
    }
    FILE *f = fopen(path, "rb");
    if (!f || fread(x, sizeof(double), (size_t)(n * d), f) != (size_t)(n * d)) {
        fprintf(stderr, "kmeans: cannot read %ld points of dimension %ld from %s\n", n, d, path);
        return 1;
    }
    fclose(f);
    memcpy(c, x, sizeof(double) * k * d);

    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    double *sums = calloc((size_t)threads * k * d, sizeof(double));
    long *counts = calloc((size_t)threads * k, sizeof(long));
    if (!sums || !counts) {
        fprintf(stderr, "kmeans: out of memory\n");
        return 1;
    }

    for (long it = 0; it < iters; it++) {
        double t0 = now_ms();
        memset(sums, 0, sizeof(double) * threads * k * d);
        memset(counts, 0, sizeof(long) * threads * k);
#pragma omp parallel
        {
            int t = 0;
#ifdef _OPENMP
            t = omp_get_thread_num();
#endif
            double *my_sums = sums + (size_t)t * k * d;
            long *my_counts = counts + (size_t)t * k;
#pragma omp for schedule(static)
            for (long i = 0; i < n; i++) {
                const double *p = x + i * d;
                long best = 0;
                double best_dist = 0.0;
                for (long j = 0; j < k; j++) {
                    const double *q = c + j * d;
                    double dist = 0.0;
                    for (long e = 0; e < d; e++) {
                        double diff = p[e] - q[e];
                        dist += diff * diff;
                    }
                    if (j == 0 || dist < best_dist) {
                        best_dist = dist;
                        best = j;
                    }
                }
                my_counts[best]++;
                for (long e = 0; e < d; e++) my_sums[best * d + e] += p[e];
            }
        }
        for (long j = 0; j < k; j++) {
            long count = 0;
            for (int t = 0; t < threads; t++) count += counts[(size_t)t * k + j];
            if (count == 0) continue; /* an empty cluster keeps its centroid */
            for (long e = 0; e < d; e++) {
                double s = 0.0;
                for (int t = 0; t < threads; t++) s += sums[(size_t)t * k * d + j * d + e];
                c[j * d + e] = s / (double)count;
            }
        }
        if (print_timing) printf("iteration %ld: %.3f ms\n", it, now_ms() - t0);
    }
    double checksum = 0.0;
    for (long i = 0; i < k * d; i++) checksum += c[i];
    printf("checksum %.6f\n", checksum);
    free(x);
    free(c);
    free(sums);
    free(counts);
    return 0;
}
