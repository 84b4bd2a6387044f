"""The kernel interface: the C programs (hostwall.bpf.c and the concern headers it includes), the one
header of every kernel↔user layout (hostwall.h), and their Python side, side by side as bcc's
libbpf-tools keep `x.bpf.c`, `x.h` and `x.c` (docs/architecture.md).

    layout      constants and NumPy dtypes of hostwall.h (checked against the C compiler)
    names       program and map names (checked against the C)
    bpfsys      bpf(2) syscalls: objects, pins, maps, batches, mmap, test-run, RCU barrier
    instance    a pinned instance's maps: config, counters, map pressure
    state       the instance state file beside the pins
    slot_table, conntrack, dos_sources   the set-associative kernel tables, mmap'ed
    ringbuf     the ring-buffer consumer and batch decode
    clock       kernel clocks → wall time, and the datapath clock's calibration
    links       which of our programs an interface carries (rtnetlink, read-only)

Both the enforcer and the collector import this package; it imports neither. No BCC here: loading
(compiling) the programs is the enforcer's job.
"""
