/* Native primes baseline for the DVM benchmark.
 *
 * Usage: primes M
 * Counts the primes below M by trial division, exactly as examples/primes.dasm: 2 is prime;
 * an odd n >= 3 is prime when no odd d with 3 <= d and d*d <= n divides it. Prints
 * `primes COUNT`.
 *
 * Built twice from this source: `gcc -O2` (single thread) and `gcc -O2 -fopenmp` (all cores,
 * dynamic schedule because the cost per n grows with sqrt(n)).
 */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s M\n", argv[0]);
        return 2;
    }
    unsigned long long m = strtoull(argv[1], NULL, 10);
    unsigned long long count = m > 2 ? 1 : 0; /* the prime 2 */
#pragma omp parallel for schedule(dynamic, 4096) reduction(+ : count)
    for (unsigned long long n = 3; n < m; n += 2) {
        int prime = 1;
        for (unsigned long long d = 3; d * d <= n; d += 2) {
            if (n % d == 0) {
                prime = 0;
                break;
            }
        }
        count += (unsigned long long)prime;
    }
    printf("primes %llu\n", count);
    return 0;
}
