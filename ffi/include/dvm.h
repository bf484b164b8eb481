/*
 * dvm.h: the C API of DVM, a datacenter-scale virtual machine for DISA programs.
 *
 * Create a VM with dvm_vm_create, give it a program (dvm_load_image_file,
 * dvm_load_image_bytes or dvm_assemble), map input data into its shared memory
 * (dvm_map_input), run it (dvm_run) with a callback receiving the console output, then read
 * the committed shared memory (dvm_read_memory) and the run's counters (dvm_get_stats).
 *
 * Errors: every function returning dvm_status sets this thread's last error message
 * (dvm_last_error_message): the empty string on DVM_OK, the reason otherwise.
 *
 * Threads: distinct dvm_vm handles are independent and may be used from different threads at
 * the same time. One handle is used by one thread at a time; a call that finds the handle in
 * use by another thread returns DVM_BUSY instead of waiting (dvm_vm_destroy excepted: it must
 * not race with any other call on its handle). See docs/C-API.md.
 */

#ifndef DVM_H
#define DVM_H

/* Generated from ffi/src/lib.rs by cbindgen (ffi/build.rs); do not edit. */

#include <stddef.h>
#include <stdint.h>

/**
 * What a call did. Every function that can fail returns one; DVM_OK is 0, so `if (status)`
 * tests for failure. The reason is in dvm_last_error_message().
 */
typedef enum dvm_status {
  /**
   * Success.
   */
  DVM_OK = 0,
  /**
   * A NULL pointer, a length above PTRDIFF_MAX, an address range outside the shared region,
   * an option out of range.
   */
  DVM_INVALID_ARGUMENT = 1,
  /**
   * A file could not be read.
   */
  DVM_IO = 2,
  /**
   * The assembly text has errors; the message lists them as FILE:LINE:COLUMN.
   */
  DVM_ASSEMBLE = 3,
  /**
   * The image is malformed (the message names the offset) or does not validate.
   */
  DVM_IMAGE = 4,
  /**
   * The run could not start: no page memory, the initial memory exceeds max_memory_bytes.
   */
  DVM_RUN = 5,
  /**
   * The run finished and at least one runner faulted. The message holds the engine's fault
   * reports (runner id, PC and symbol, instruction, address); the other runners' commits
   * stand, and dvm_read_memory and dvm_get_stats work as after a successful run.
   */
  DVM_PROGRAM_FAULTED = 6,
  /**
   * A bug in DVM (an internal error or a caught panic); the message says what.
   */
  DVM_INTERNAL = 7,
  /**
   * The call does not fit the handle's state: dvm_run before a program was given,
   * dvm_read_memory or dvm_get_stats before a run finished.
   */
  DVM_STATE = 8,
  /**
   * Another thread is using the handle (or a run's callback called back into its own
   * handle). Nothing was done.
   */
  DVM_BUSY = 9,
} dvm_status;

/**
 * Which console stream output belongs to.
 */
typedef enum dvm_stream {
  /**
   * The program's own output (console word, write system calls) of runners that committed
   * or aborted.
   */
  DVM_STREAM_STDOUT = 1,
  /**
   * DVM's reports about the program: a runner's fault report or failed commit, each
   * followed by the output that runner left pending.
   */
  DVM_STREAM_STDERR = 2,
} dvm_stream;

/**
 * A VM: its options, its program, the input mapped into it, and what its last run left
 * (committed memory, counters). Opaque; create with dvm_vm_create, free with dvm_vm_destroy.
 */
typedef struct dvm_vm dvm_vm;

/**
 * How a VM runs its programs. Fill it with dvm_options_init, then change what you need.
 */
typedef struct dvm_options {
  /**
   * Worker threads; 0 (the default): one per core. At most 4096.
   */
  uint32_t workers;
  /**
   * Nonzero (the default): pin each worker to a processor.
   */
  int pin_workers;
  /**
   * Instructions one runner may execute before it faults; 0 (the default): unlimited.
   */
  uint64_t max_instructions;
  /**
   * Page memory the whole run may use, in bytes; 0 (the default): half the machine's
   * memory.
   */
  uint64_t max_memory_bytes;
  /**
   * Runners that may exist at once (queued, running, or waiting for their parent);
   * default 1000000, at least 1.
   */
  uint64_t max_runners;
} dvm_options;

/**
 * Receives console output during dvm_run: `len` bytes at `bytes` (valid only during the call)
 * of `stream`, and the `user_data` given to dvm_run. Called from a thread DVM owns, never
 * from two threads at once, in the order the runners ended (the order the dvm command prints);
 * every call happens before dvm_run returns. It must not call dvm_ functions on the handle
 * being run (they return DVM_BUSY), must not unwind (C++ exceptions, longjmp) out of the
 * call, and should return promptly: the run holds further output back while it waits.
 */
typedef void (*dvm_output_fn)(enum dvm_stream stream, const uint8_t *bytes, size_t len, void *user_data);

/**
 * The counters of the last finished run (the dvm command's `--stats`), and its exit code.
 */
typedef struct dvm_stats {
  /**
   * Worker threads the run used.
   */
  uint64_t workers;
  /**
   * Instructions executed by all runners.
   */
  uint64_t instructions;
  uint64_t runners_started;
  uint64_t runners_committed;
  uint64_t runners_aborted;
  /**
   * Runners whose commit failed on a write-write conflict.
   */
  uint64_t runners_failed;
  uint64_t runners_faulted;
  /**
   * Write-write conflicts found at commit.
   */
  uint64_t conflicts;
  uint64_t watcher_activations;
  /**
   * 4 KiB pages allocated, and of those, copies of a page.
   */
  uint64_t pages_allocated;
  uint64_t pages_copied;
  /**
   * Old page versions freed during the run.
   */
  uint64_t versions_pruned;
  uint64_t peak_memory_bytes;
  /**
   * Internal errors of DVM (always 0 unless DVM has a bug).
   */
  uint64_t internal_errors;
  /**
   * From creating the machine to the end of the run, in milliseconds.
   */
  double wall_time_ms;
  /**
   * The dvm command's exit status for this run: 0 every runner ended by its own choice
   * (commit, abort, failed commit), 1 a runner faulted, 2 an internal error.
   */
  int32_t exit_code;
} dvm_stats;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * Fills `*options` with the defaults: every field 0 but pin_workers = 1 and max_runners =
 * 1000000. Always start from this, so that fields added later get their defaults.
 * Thread-safe (touches only `*options`).
 *
 * Returns DVM_INVALID_ARGUMENT if `options` is NULL.
 */
enum dvm_status dvm_options_init(struct dvm_options *options);

/**
 * Creates a VM with `options` (NULL: the defaults of dvm_options_init) and stores it in
 * `*out` (NULL on failure). The options are copied. Creating the VM reserves no memory and
 * starts no thread: a run does, and ends them before it returns. Thread-safe.
 *
 * Returns DVM_INVALID_ARGUMENT if `out` is NULL or an option is out of range.
 */
enum dvm_status dvm_vm_create(const struct dvm_options *options, struct dvm_vm **out);

/**
 * Frees a VM and everything it holds (program, inputs, the last run's memory). NULL is
 * ignored. Not thread-safe with respect to `vm`: no other call on `vm` may be in progress or
 * follow. Never fails (the thread's last error is left unchanged).
 */
void dvm_vm_destroy(struct dvm_vm *vm);

/**
 * Loads a program image (flat or ELF, as `dvm asm` writes) from the file at `path` (a
 * NUL-terminated path) and makes it the VM's program, replacing any previous one. The image
 * is validated and decoded here, once. Inputs mapped earlier stay. One thread at a time per
 * handle.
 *
 * Returns DVM_IO if the file cannot be read, DVM_IMAGE if it is not a valid image (the
 * message names the byte offset).
 */
enum dvm_status dvm_load_image_file(struct dvm_vm *vm, const char *path);

/**
 * Loads a program image from `len` bytes at `bytes` (copied; the buffer may be freed when
 * the call returns), as dvm_load_image_file does. One thread at a time per handle.
 *
 * Returns DVM_INVALID_ARGUMENT if `bytes` is NULL, DVM_IMAGE if they are not a valid image.
 */
enum dvm_status dvm_load_image_bytes(struct dvm_vm *vm, const uint8_t *bytes, size_t len);

/**
 * Assembles `len` bytes of `.dasm` text at `source` (UTF-8, need not be NUL-terminated) and
 * makes the result the VM's program, replacing any previous one. `name` (NUL-terminated, or
 * NULL for "<source>") names the text in error messages. One thread at a time per handle.
 *
 * Returns DVM_ASSEMBLE if the text has errors: the message starts with the first as
 * `NAME:LINE:COLUMN: message`, then lists every error (up to 50) with its source line, as the
 * dvm command prints them. DVM_IMAGE if the assembled program does not validate.
 */
enum dvm_status dvm_assemble(struct dvm_vm *vm, const char *name, const char *source, size_t len);

/**
 * Maps `len` bytes at `bytes` (copied) into shared memory at `addr` for the runs that follow,
 * as the dvm command's `--load FILE@ADDR`: the root runner's snapshot and every later one
 * sees them as committed before the run. Call it several times for several inputs; they stay
 * mapped for every later run until dvm_clear_inputs. One thread at a time per handle.
 *
 * Returns DVM_INVALID_ARGUMENT if `bytes` is NULL or the range does not lie inside one
 * space's shared region (0x800000000 .. 0x100000000000). An input that overlaps the program
 * image, or inputs that exceed max_memory_bytes, make dvm_run fail with
 * DVM_INVALID_ARGUMENT or DVM_RUN.
 */
enum dvm_status dvm_map_input(struct dvm_vm *vm, uint64_t addr, const uint8_t *bytes, size_t len);

/**
 * Forgets every input mapped with dvm_map_input. One thread at a time per handle.
 */
enum dvm_status dvm_clear_inputs(struct dvm_vm *vm);

/**
 * Sets what the program reads from the console (a u64 load of the console word) in the runs
 * that follow: `len` bytes at `bytes`, copied, then end of input. By default the console
 * input is empty: a VM never reads the process's stdin. One thread at a time per handle.
 *
 * Returns DVM_INVALID_ARGUMENT if `bytes` is NULL.
 */
enum dvm_status dvm_set_console_input(struct dvm_vm *vm, const uint8_t *bytes, size_t len);

/**
 * Runs the program to completion: the root runner, every runner it starts, until none is
 * left. Console output goes to `callback` with `user_data` as it is produced (see
 * dvm_output_fn); with a NULL callback it goes to the process's stdout and stderr, as the dvm
 * command prints it. Every thread the run starts has ended when dvm_run returns. The run
 * starts from the program and the mapped inputs each time; the previous run's memory and
 * counters are dropped when it starts. One thread at a time per handle: for the whole run,
 * other calls on `vm` return DVM_BUSY. Distinct handles may run at the same time.
 *
 * Returns DVM_OK when every runner ended by its own choice (commit, abort, or a commit that
 * failed on a conflict). DVM_PROGRAM_FAULTED when a runner faulted: the message holds the
 * engine's fault reports (also given to the callback on DVM_STREAM_STDERR); the memory and
 * counters are readable as after DVM_OK. DVM_STATE if no program was given; DVM_RUN or
 * DVM_INVALID_ARGUMENT if the run could not start (nothing is then readable); DVM_INTERNAL on
 * a bug in DVM.
 */
enum dvm_status dvm_run(struct dvm_vm *vm, dvm_output_fn callback, void *user_data);

/**
 * Copies `len` bytes of the last run's committed shared memory, from `addr` on, into `buf`:
 * the newest committed value of every byte (what a runner starting after the run would see;
 * zeros where nothing was ever written). Private memory ends with its runner and cannot be
 * read. One thread at a time per handle.
 *
 * Returns DVM_INVALID_ARGUMENT if `buf` is NULL or the range is not inside one space's
 * shared region (0x800000000 .. 0x100000000000 of a space); DVM_STATE if no run has finished
 * (after DVM_OK or DVM_PROGRAM_FAULTED) since the VM was created.
 */
enum dvm_status dvm_read_memory(struct dvm_vm *vm, uint64_t addr, uint8_t *buf, size_t len);

/**
 * Stores the last finished run's counters and exit code in `*out`. One thread at a time per
 * handle.
 *
 * Returns DVM_INVALID_ARGUMENT if `out` is NULL, DVM_STATE if no run has finished.
 */
enum dvm_status dvm_get_stats(struct dvm_vm *vm, struct dvm_stats *out);

/**
 * The message of the last call on this thread that returned a dvm_status: the empty string
 * after DVM_OK, the reason otherwise (possibly several lines; UTF-8). Never NULL. The string
 * belongs to DVM and stays valid until the next dvm_ call on the same thread; copy it to keep
 * it. Thread-safe: each thread has its own.
 */
const char *dvm_last_error_message(void);

/**
 * The name of a status code ("DVM_OK", "DVM_PROGRAM_FAULTED", ...), or "DVM_UNKNOWN_STATUS"
 * for a value that is none of them. A static string; never NULL. Thread-safe.
 */
const char *dvm_status_name(int status);

/**
 * DVM's version, as "MAJOR.MINOR.PATCH". A static string; never NULL. Thread-safe.
 */
const char *dvm_version(void);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* DVM_H */
