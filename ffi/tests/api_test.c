/*
 * api_test.c: drives DVM through its C API as an embedding program would, and checks what
 * comes back. Built and run by ffi/tests/c_api.rs (against libdvm.so, against libdvm.a, and
 * under valgrind); it prints "api_test: all checks passed" and exits 0, or lists the failed
 * checks and exits 1.
 *
 * Usage: api_test REPO_ROOT HELLO_IMAGE WORKERS
 *   REPO_ROOT    the checkout (examples/hello.dasm and kmeans.dasm, tests/conformance/data/kmeans_data.bin)
 *   HELLO_IMAGE  examples/hello.dasm assembled into an ELF image (`dvm asm`)
 *   WORKERS      worker threads per run (1 under valgrind)
 */
#include "dvm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

#define CHECK(cond, what)                                                             \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "api_test.c:%d: check failed: %s (%s)\n", __LINE__, what, \
                    #cond);                                                           \
            failures++;                                                               \
        }                                                                             \
    } while (0)

/* A call that must return `expected`; on a mismatch, says what it returned and why. */
static int expect(dvm_status got, dvm_status expected, const char *what, int line) {
    if (got == expected) {
        return 1;
    }
    fprintf(stderr, "api_test.c:%d: %s returned %s, expected %s; message: %s\n", line, what,
            dvm_status_name((int)got), dvm_status_name((int)expected), dvm_last_error_message());
    failures++;
    return 0;
}
#define EXPECT(call, expected) expect((call), (expected), #call, __LINE__)

/* What a run's callback received. */
typedef struct {
    char *out;
    size_t out_len;
    char *err;
    size_t err_len;
    unsigned calls;
    /* When set, the callback tries a call on the handle being run (it must be refused). */
    dvm_vm *reenter;
    dvm_status reentered;
} capture;

static void append(char **buf, size_t *len, const uint8_t *bytes, size_t n) {
    char *grown = realloc(*buf, *len + n + 1);
    if (grown == NULL) {
        fprintf(stderr, "api_test: out of memory\n");
        exit(2);
    }
    memcpy(grown + *len, bytes, n);
    *len += n;
    grown[*len] = '\0';
    *buf = grown;
}

static void on_output(enum dvm_stream stream, const uint8_t *bytes, size_t len, void *user_data) {
    capture *c = user_data;
    c->calls++;
    if (stream == DVM_STREAM_STDOUT) {
        append(&c->out, &c->out_len, bytes, len);
    } else {
        append(&c->err, &c->err_len, bytes, len);
    }
    if (c->reenter != NULL) {
        dvm_stats stats;
        c->reentered = dvm_get_stats(c->reenter, &stats);
    }
}

static void capture_reset(capture *c) {
    free(c->out);
    free(c->err);
    memset(c, 0, sizeof *c);
}

static const char *out_of(const capture *c) { return c->out != NULL ? c->out : ""; }
static const char *err_of(const capture *c) { return c->err != NULL ? c->err : ""; }

static char *read_file(const char *path, size_t *len) {
    FILE *file = fopen(path, "rb");
    char *bytes = NULL;
    long size;
    if (file == NULL) {
        fprintf(stderr, "api_test: cannot open %s\n", path);
        exit(2);
    }
    if (fseek(file, 0, SEEK_END) != 0 || (size = ftell(file)) < 0 || fseek(file, 0, SEEK_SET) != 0) {
        fprintf(stderr, "api_test: cannot size %s\n", path);
        exit(2);
    }
    bytes = malloc((size_t)size + 1);
    if (bytes == NULL || fread(bytes, 1, (size_t)size, file) != (size_t)size) {
        fprintf(stderr, "api_test: cannot read %s\n", path);
        exit(2);
    }
    bytes[size] = '\0';
    fclose(file);
    *len = (size_t)size;
    return bytes;
}

static char *join(const char *dir, const char *rest) {
    size_t n = strlen(dir) + strlen(rest) + 2;
    char *path = malloc(n);
    if (path == NULL) {
        exit(2);
    }
    snprintf(path, n, "%s/%s", dir, rest);
    return path;
}

static dvm_status assemble_text(dvm_vm *vm, const char *name, const char *text) {
    return dvm_assemble(vm, name, text, strlen(text));
}

static dvm_status assemble_file(dvm_vm *vm, const char *path) {
    size_t len;
    char *text = read_file(path, &len);
    dvm_status status = dvm_assemble(vm, path, text, len);
    free(text);
    return status;
}

static uint64_t u64_at(const uint8_t *bytes) {
    uint64_t value;
    memcpy(&value, bytes, sizeof value);
    return value;
}

static const char HELLO_OUT[] = "Hello from DVM!\n";

/* Stores 42 into a shared word and commits. */
static const char STORE_PROGRAM[] =
    "main:\n"
    "    mov $42:ue, 0x4000000008:ue\n"
    "    exit:c\n";

/* Stores 7, then divides by zero: the root faults and its store is discarded. */
static const char FAULT_PROGRAM[] =
    "main:\n"
    "    mov $7:ue, 0x4000000000:ue\n"
    "    div:se 0x4000000000, $0, 0x4000000008\n"
    "    exit:c\n";

/* Copies the console input to the console output. */
static const char ECHO_PROGRAM[] =
    ".equ IN, 0x100000200\n"
    ".equ OUT, 0x100000208\n"
    ".equ B, 0x200000000\n"
    "main:\n"
    "    mov IN:se, B:se\n"
    "    br:l,se,a B, $0, $done\n"
    "    mov B:ue, OUT:ue\n"
    "    br:j,a $main\n"
    "done:\n"
    "    exit:c\n";

static void test_names(void) {
    CHECK(strcmp(dvm_status_name(DVM_OK), "DVM_OK") == 0, "name of DVM_OK");
    CHECK(strcmp(dvm_status_name(DVM_PROGRAM_FAULTED), "DVM_PROGRAM_FAULTED") == 0,
          "name of DVM_PROGRAM_FAULTED");
    CHECK(strcmp(dvm_status_name(1234), "DVM_UNKNOWN_STATUS") == 0, "name of a bogus status");
    CHECK(strlen(dvm_version()) >= 5, "version string");
}

static void test_bad_arguments(void) {
    dvm_options options;
    dvm_vm *vm = (dvm_vm *)&options; /* must be overwritten with NULL on failure */
    uint8_t byte = 0;
    capture c = {0};

    EXPECT(dvm_options_init(NULL), DVM_INVALID_ARGUMENT);
    CHECK(strstr(dvm_last_error_message(), "NULL") != NULL, "a NULL argument is named");
    EXPECT(dvm_vm_create(NULL, NULL), DVM_INVALID_ARGUMENT);
    EXPECT(dvm_options_init(&options), DVM_OK);
    CHECK(dvm_last_error_message()[0] == '\0', "DVM_OK leaves an empty message");
    CHECK(options.workers == 0 && options.pin_workers == 1 && options.max_instructions == 0 &&
              options.max_memory_bytes == 0 && options.max_runners == 1000000,
          "option defaults");
    options.workers = 5000;
    EXPECT(dvm_vm_create(&options, &vm), DVM_INVALID_ARGUMENT);
    CHECK(vm == NULL, "a failed create stores NULL");
    options.workers = 1;
    options.max_runners = 0;
    EXPECT(dvm_vm_create(&options, &vm), DVM_INVALID_ARGUMENT);

    /* NULL handles are errors, not crashes. */
    EXPECT(dvm_run(NULL, NULL, NULL), DVM_INVALID_ARGUMENT);
    EXPECT(dvm_assemble(NULL, NULL, "main:\n", 6), DVM_INVALID_ARGUMENT);
    EXPECT(dvm_read_memory(NULL, 0x4000000000ULL, &byte, 1), DVM_INVALID_ARGUMENT);
    EXPECT(dvm_get_stats(NULL, NULL), DVM_INVALID_ARGUMENT);
    EXPECT(dvm_map_input(NULL, 0x4000000000ULL, &byte, 1), DVM_INVALID_ARGUMENT);
    EXPECT(dvm_clear_inputs(NULL), DVM_INVALID_ARGUMENT);
    EXPECT(dvm_load_image_file(NULL, "x"), DVM_INVALID_ARGUMENT);
    dvm_vm_destroy(NULL);

    EXPECT(dvm_vm_create(NULL, &vm), DVM_OK);
    CHECK(vm != NULL, "create stores a handle");
    /* Out of order: nothing to run, nothing to read yet. */
    EXPECT(dvm_run(vm, on_output, &c), DVM_STATE);
    EXPECT(dvm_read_memory(vm, 0x4000000000ULL, &byte, 1), DVM_STATE);
    EXPECT(dvm_get_stats(vm, NULL), DVM_STATE);
    /* NULL buffers, absurd lengths, ranges outside the shared region. */
    EXPECT(dvm_assemble(vm, "x.dasm", NULL, 4), DVM_INVALID_ARGUMENT);
    EXPECT(dvm_load_image_bytes(vm, NULL, 0), DVM_INVALID_ARGUMENT);
    EXPECT(dvm_load_image_bytes(vm, &byte, SIZE_MAX), DVM_INVALID_ARGUMENT);
    EXPECT(dvm_map_input(vm, 0x4000000000ULL, NULL, 8), DVM_INVALID_ARGUMENT);
    EXPECT(dvm_map_input(vm, 0x4000000000ULL, &byte, SIZE_MAX), DVM_INVALID_ARGUMENT);
    EXPECT(dvm_map_input(vm, 0x1000, &byte, 1), DVM_INVALID_ARGUMENT);
    CHECK(strstr(dvm_last_error_message(), "shared region") != NULL, "outside shared is named");
    EXPECT(dvm_map_input(vm, UINT64_MAX, &byte, 1), DVM_INVALID_ARGUMENT);
    EXPECT(dvm_set_console_input(vm, NULL, 0), DVM_INVALID_ARGUMENT);
    EXPECT(dvm_load_image_file(vm, NULL), DVM_INVALID_ARGUMENT);
    EXPECT(dvm_load_image_file(vm, "/nonexistent/dir/prog.disa"), DVM_IO);
    CHECK(strstr(dvm_last_error_message(), "/nonexistent/dir/prog.disa") != NULL,
          "an unreadable file is named");
    EXPECT(dvm_load_image_bytes(vm, (const uint8_t *)"garbage!", 8), DVM_IMAGE);
    CHECK(dvm_last_error_message()[0] != '\0', "a bad image has a message");
    dvm_vm_destroy(vm);
    capture_reset(&c);
}

static void test_assemble_errors(void) {
    dvm_vm *vm = NULL;
    const char *message;
    static const char bad[] = "main:\n    add:se 1, 2\n    exit:c\n";
    static const char not_utf8[] = "main:\n    exit:c \xff\n";
    if (!EXPECT(dvm_vm_create(NULL, &vm), DVM_OK)) {
        return;
    }
    EXPECT(assemble_text(vm, "bad.dasm", bad), DVM_ASSEMBLE);
    message = dvm_last_error_message();
    CHECK(strncmp(message, "bad.dasm:2:", 11) == 0, "the message starts with FILE:LINE:COLUMN");
    CHECK(strstr(message, "error:") != NULL && strstr(message, "add:se 1, 2") != NULL,
          "the message shows the error and its source line");
    EXPECT(assemble_text(vm, "utf8.dasm", not_utf8), DVM_ASSEMBLE);
    CHECK(strstr(dvm_last_error_message(), "UTF-8") != NULL, "non-UTF-8 text is named");
    EXPECT(dvm_assemble(vm, NULL, bad, strlen(bad)), DVM_ASSEMBLE);
    CHECK(strncmp(dvm_last_error_message(), "<source>:2:", 11) == 0, "a NULL name");
    /* A failed assembly leaves no program. */
    EXPECT(dvm_run(vm, NULL, NULL), DVM_STATE);
    dvm_vm_destroy(vm);
}

static void test_hello(const char *repo, const char *hello_image, const dvm_options *options) {
    dvm_vm *vm = NULL;
    capture c = {0};
    dvm_stats stats;
    char *path = join(repo, "examples/hello.dasm");
    size_t image_len;
    char *image;
    int round;

    if (!EXPECT(dvm_vm_create(options, &vm), DVM_OK)) {
        free(path);
        return;
    }
    /* Three ways to the same program: .dasm text, an image file, image bytes. */
    for (round = 0; round < 3; round++) {
        if (round == 0) {
            EXPECT(assemble_file(vm, path), DVM_OK);
        } else if (round == 1) {
            EXPECT(dvm_load_image_file(vm, hello_image), DVM_OK);
        } else {
            image = read_file(hello_image, &image_len);
            EXPECT(dvm_load_image_bytes(vm, (const uint8_t *)image, image_len), DVM_OK);
            free(image);
        }
        capture_reset(&c);
        EXPECT(dvm_run(vm, on_output, &c), DVM_OK);
        CHECK(strcmp(out_of(&c), HELLO_OUT) == 0, "hello's output reaches the callback");
        CHECK(c.err_len == 0, "hello writes nothing to stderr");
        memset(&stats, 0xff, sizeof stats);
        EXPECT(dvm_get_stats(vm, &stats), DVM_OK);
        CHECK(stats.exit_code == 0, "hello's exit code");
        CHECK(stats.runners_started == 1 && stats.runners_committed == 1, "one runner committed");
        CHECK(stats.runners_faulted == 0 && stats.internal_errors == 0, "nothing faulted");
        CHECK(stats.workers == (uint64_t)options->workers, "the workers asked for");
        CHECK(stats.instructions > 16, "instructions are counted");
        CHECK(stats.wall_time_ms >= 0.0, "wall time");
    }

    /* The callback runs while the handle is held: calling back into it is refused. */
    capture_reset(&c);
    c.reenter = vm;
    c.reentered = DVM_OK;
    EXPECT(dvm_run(vm, on_output, &c), DVM_OK);
    CHECK(c.reentered == DVM_BUSY, "a call from the callback on its own handle gets DVM_BUSY");
    CHECK(c.calls >= 1, "the callback was called");
    capture_reset(&c);
    free(path);
    dvm_vm_destroy(vm);
}

static void test_memory(const dvm_options *options) {
    dvm_vm *vm = NULL;
    capture c = {0};
    uint8_t words[16];
    uint8_t byte;
    dvm_options small;
    uint8_t *big;
    if (!EXPECT(dvm_vm_create(options, &vm), DVM_OK)) {
        return;
    }
    EXPECT(assemble_text(vm, "store.dasm", STORE_PROGRAM), DVM_OK);
    EXPECT(dvm_run(vm, on_output, &c), DVM_OK);
    memset(words, 0xee, sizeof words);
    EXPECT(dvm_read_memory(vm, 0x4000000000ULL, words, sizeof words), DVM_OK);
    CHECK(u64_at(words) == 0, "memory nobody wrote reads as zeros");
    CHECK(u64_at(words + 8) == 42, "the committed store reads back");
    EXPECT(dvm_read_memory(vm, 0x4000000008ULL, words, 0), DVM_OK);
    EXPECT(dvm_read_memory(vm, 0x4000000000ULL, NULL, 8), DVM_INVALID_ARGUMENT);
    EXPECT(dvm_read_memory(vm, 0x100000000ULL, &byte, 1), DVM_INVALID_ARGUMENT);
    CHECK(strstr(dvm_last_error_message(), "shared region") != NULL, "private memory is refused");
    EXPECT(dvm_read_memory(vm, 0xfffffffffff0ULL, words, sizeof words), DVM_INVALID_ARGUMENT);
    EXPECT(dvm_read_memory(vm, UINT64_MAX, words, 2), DVM_INVALID_ARGUMENT);

    /* An input is there for every run until it is cleared. */
    memset(words, 0x55, sizeof words);
    EXPECT(dvm_map_input(vm, 0x4000000000ULL, words, 8), DVM_OK);
    EXPECT(dvm_run(vm, on_output, &c), DVM_OK);
    EXPECT(dvm_read_memory(vm, 0x4000000000ULL, words, sizeof words), DVM_OK);
    CHECK(u64_at(words) == 0x5555555555555555ULL && u64_at(words + 8) == 42, "input and store");
    EXPECT(dvm_clear_inputs(vm), DVM_OK);
    EXPECT(dvm_run(vm, on_output, &c), DVM_OK);
    EXPECT(dvm_read_memory(vm, 0x4000000000ULL, words, sizeof words), DVM_OK);
    CHECK(u64_at(words) == 0 && u64_at(words + 8) == 42, "a cleared input is gone");

    /* Inputs the run cannot take: over the program image, beyond the memory limit. */
    EXPECT(dvm_map_input(vm, 0x800000000ULL, words, 8), DVM_OK);
    EXPECT(dvm_run(vm, on_output, &c), DVM_INVALID_ARGUMENT);
    CHECK(strstr(dvm_last_error_message(), "overlaps the program image") != NULL,
          "an input over the image is named");
    EXPECT(dvm_read_memory(vm, 0x4000000000ULL, words, 8), DVM_STATE);
    EXPECT(dvm_clear_inputs(vm), DVM_OK);
    capture_reset(&c);
    dvm_vm_destroy(vm);

    small = *options;
    small.max_memory_bytes = 64 * 1024;
    big = calloc(1, 1 << 20);
    if (EXPECT(dvm_vm_create(&small, &vm), DVM_OK) && big != NULL) {
        EXPECT(assemble_text(vm, "store.dasm", STORE_PROGRAM), DVM_OK);
        EXPECT(dvm_map_input(vm, 0x4000000000ULL, big, 1 << 20), DVM_OK);
        EXPECT(dvm_run(vm, on_output, &c), DVM_RUN);
        CHECK(strstr(dvm_last_error_message(), "do not fit in max_memory_bytes") != NULL,
              "the memory limit is named");
    }
    free(big);
    capture_reset(&c);
    dvm_vm_destroy(vm);
}

static void test_fault(const dvm_options *options) {
    dvm_vm *vm = NULL;
    capture c = {0};
    dvm_stats stats;
    uint8_t word[8];
    const char *message;
    if (!EXPECT(dvm_vm_create(options, &vm), DVM_OK)) {
        return;
    }
    EXPECT(assemble_text(vm, "fault.dasm", FAULT_PROGRAM), DVM_OK);
    EXPECT(dvm_run(vm, on_output, &c), DVM_PROGRAM_FAULTED);
    message = dvm_last_error_message();
    CHECK(strstr(message, "1 runner(s) faulted") != NULL, "the message counts the faults");
    CHECK(strstr(message, "division by zero") != NULL, "the report names the fault");
    CHECK(strstr(message, "div:se") != NULL, "the report shows the instruction");
    CHECK(strstr(message, "(main+") != NULL, "the report names the symbol");
    CHECK(strstr(err_of(&c), "faulted: division by zero") != NULL,
          "the callback receives the report on DVM_STREAM_STDERR");
    CHECK(c.out_len == 0, "nothing on stdout");
    EXPECT(dvm_get_stats(vm, &stats), DVM_OK);
    CHECK(stats.exit_code == 1 && stats.runners_faulted == 1, "the fault is counted");
    EXPECT(dvm_read_memory(vm, 0x4000000000ULL, word, sizeof word), DVM_OK);
    CHECK(u64_at(word) == 0, "a faulted runner's store is discarded");
    capture_reset(&c);
    dvm_vm_destroy(vm);
}

static void test_console_input(const dvm_options *options) {
    dvm_vm *vm = NULL;
    capture c = {0};
    if (!EXPECT(dvm_vm_create(options, &vm), DVM_OK)) {
        return;
    }
    EXPECT(assemble_text(vm, "echo.dasm", ECHO_PROGRAM), DVM_OK);
    EXPECT(dvm_run(vm, on_output, &c), DVM_OK);
    CHECK(c.out_len == 0, "the console input is empty by default");
    capture_reset(&c);
    EXPECT(dvm_set_console_input(vm, (const uint8_t *)"ping\n", 5), DVM_OK);
    EXPECT(dvm_run(vm, on_output, &c), DVM_OK);
    CHECK(strcmp(out_of(&c), "ping\n") == 0, "the console input is read");
    capture_reset(&c);
    dvm_vm_destroy(vm);
}

/* k-means (examples/kmeans.dasm) on the conformance data set: N=200 D=3 K=4 I=5 P=3. The
 * parameters are built here, the points come from the data file; both are mapped from C. */
static void test_kmeans(const char *repo, const dvm_options *options) {
    enum { N = 200, D = 3, K = 4, I = 5, P = 3 };
    const uint64_t params[6] = {N, D, K, I, P, 0};
    char *program = join(repo, "examples/kmeans.dasm");
    char *data_path = join(repo, "tests/conformance/data/kmeans_data.bin");
    size_t data_len;
    char *data = read_file(data_path, &data_len);
    dvm_vm *vm = NULL;
    capture c = {0};
    dvm_stats stats;
    double centroids[K * D];
    double sum = 0.0;
    char text[64];
    uint8_t *back;
    int i;

    CHECK(data_len == N * D * sizeof(double), "the data file holds N*D doubles");
    if (!EXPECT(dvm_vm_create(options, &vm), DVM_OK)) {
        goto done;
    }
    EXPECT(assemble_file(vm, program), DVM_OK);
    EXPECT(dvm_map_input(vm, 0x4000000000ULL, (const uint8_t *)params, sizeof params), DVM_OK);
    EXPECT(dvm_map_input(vm, 0x5000000000ULL, (const uint8_t *)data, data_len), DVM_OK);
    EXPECT(dvm_run(vm, on_output, &c), DVM_OK);
    /* The oracle's value (scripts/gen-workload-tests.py; tests/conformance/workload_kmeans.out). */
    CHECK(strcmp(out_of(&c), "checksum 3.071893\n") == 0, "k-means's checksum");
    if (strcmp(out_of(&c), "checksum 3.071893\n") != 0) {
        fprintf(stderr, "k-means printed: [%s], stderr: [%s]\n", out_of(&c), err_of(&c));
    }
    EXPECT(dvm_get_stats(vm, &stats), DVM_OK);
    CHECK(stats.runners_committed > P * I, "the partitions and combiners committed");
    CHECK(stats.watcher_activations >= I, "the combiners ran as watchers");

    /* The final centroids, read back from committed memory (CENT), sum to the checksum. */
    EXPECT(dvm_read_memory(vm, 0x6000001000ULL, (uint8_t *)centroids, sizeof centroids), DVM_OK);
    for (i = 0; i < K * D; i++) {
        sum += centroids[i];
    }
    snprintf(text, sizeof text, "checksum %.6f\n", sum);
    CHECK(strcmp(text, "checksum 3.071893\n") == 0, "the centroids in memory give the checksum");

    /* The mapped input reads back byte for byte, across its page boundary. */
    back = malloc(data_len);
    if (back != NULL) {
        EXPECT(dvm_read_memory(vm, 0x5000000000ULL, back, data_len), DVM_OK);
        CHECK(memcmp(back, data, data_len) == 0, "the input reads back");
        free(back);
    }
done:
    capture_reset(&c);
    dvm_vm_destroy(vm);
    free(data);
    free(data_path);
    free(program);
}

int main(int argc, char **argv) {
    dvm_options options;
    if (argc != 4) {
        fprintf(stderr, "usage: api_test REPO_ROOT HELLO_IMAGE WORKERS\n");
        return 2;
    }
    dvm_options_init(&options);
    options.workers = (uint32_t)strtoul(argv[3], NULL, 10);
    options.pin_workers = 0;
    options.max_memory_bytes = 1ULL << 30;

    test_names();
    test_bad_arguments();
    test_assemble_errors();
    test_hello(argv[1], argv[2], &options);
    test_memory(&options);
    test_fault(&options);
    test_console_input(&options);
    test_kmeans(argv[1], &options);

    if (failures > 0) {
        fprintf(stderr, "api_test: %d check(s) failed\n", failures);
        return 1;
    }
    printf("api_test: all checks passed\n");
    return 0;
}
