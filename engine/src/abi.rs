//! The runtime ABI as constants: the memory map, the fixed words of the private region, and the
//! system-call numbers (`docs/DISA.md` §Runtime ABI). Every other module names these instead of
//! repeating numbers, so the map is written down exactly once.

use std::ops::Range;

/// Private region: per runner, sparse, zero-filled, never committed.
pub const PRIVATE_BASE: u64 = 0x1_0000_0000;
pub const PRIVATE_END: u64 = 0x8_0000_0000;
/// Shared region: snapshotted and committed.
pub const SHARED_BASE: u64 = 0x8_0000_0000;
pub const SHARED_END: u64 = 0x1000_0000_0000;
/// Flat images and `.text` load here.
pub const CODE_BASE: u64 = 0x8_0000_0000;
/// Aliased memory region: the same memory in every space.
pub const AMR_BASE: u64 = 0x208_0000_0000;
pub const AMR_END: u64 = 0xA08_0000_0000;
/// Persistent range (inside the shared region): survives a run with `--persist`.
pub const PERSIST_BASE: u64 = 0x400_0000_0000;
pub const PERSIST_END: u64 = 0x1000_0000_0000;
/// `space = address >> SPACE_SHIFT`; 64 spaces.
pub const SPACE_SHIFT: u32 = 46;
pub const SPACE_COUNT: u64 = 64;

/// Runner ids are addresses of 4 KiB exit-record pages, allocated upward from here.
pub const EXIT_RECORD_BASE: u64 = 0x3d0_0000_0000;
/// The first ids are reserved.
pub const EXIT_RECORD_RESERVED: u64 = 16;
/// Exit-record area end (exclusive).
pub const EXIT_RECORD_END: u64 = 0x400_0000_0000;
/// Offset of the runtime's status word in an exit-record page.
pub const EXIT_STATUS_OFFSET: u64 = 0xFF8;

/// `malloc` heap: offsets within each space.
pub const HEAP_AREA: Range<u64> = 0x100_0000_0000..0x180_0000_0000;
/// Runtime stacks: offsets within each space.
pub const STACK_AREA: Range<u64> = 0x180_0000_0000..0x200_0000_0000;

/// A part of the shared region the runtime hands out or writes itself (MEMORY-MODEL §1), so
/// that no image section or `--load` may lie there: the runtime would give the same bytes to
/// `malloc`, to a runner's stack or to an exit record, and the program's data would be
/// silently overwritten, or overwrite them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservedArea {
    pub name: &'static str,
    /// Offsets within a space. Each space has the area at the same offsets (for the exit
    /// records, which lie in the AMR, those are the same bytes in every space).
    pub offsets: Range<u64>,
}

/// The runtime-reserved areas, from the constants above. The image's own range is not here
/// (what a load may not overlap is the image's actual sections), and neither is the persistent
/// range: the runtime never writes it on its own, so without `--persist` it is ordinary memory
/// (the engine adds it for runs with `--persist`).
pub const RESERVED_AREAS: [ReservedArea; 3] = [
    ReservedArea {
        name: "heap area",
        offsets: HEAP_AREA,
    },
    ReservedArea {
        name: "stack area",
        offsets: STACK_AREA,
    },
    ReservedArea {
        name: "exit-record area",
        offsets: EXIT_RECORD_BASE..EXIT_RECORD_END,
    },
];

/// Where `start..end` (absolute, non-empty) first meets one of `areas`, in address order
/// within each space: the area and the absolute addresses of the overlap.
pub fn first_reserved_overlap(
    areas: &[ReservedArea],
    start: u64,
    end: u64,
) -> Option<(&ReservedArea, Range<u64>)> {
    if start >= end {
        return None;
    }
    let first_space = start >> SPACE_SHIFT;
    let last_space = ((end - 1) >> SPACE_SHIFT).min(SPACE_COUNT - 1);
    (first_space..=last_space).find_map(|space| {
        let base = space << SPACE_SHIFT;
        areas
            .iter()
            .filter_map(|area| {
                let lo = start.max(base + area.offsets.start);
                let hi = end.min(base + area.offsets.end);
                (lo < hi).then_some((area, lo..hi))
            })
            .min_by_key(|(_, overlap)| overlap.start)
    })
}

/// Words of the private region the runtime fills in.
pub const PR_STACK_BASE: u64 = 0x1_0000_0100;
pub const PR_STACK_SIZE: u64 = 0x1_0000_0108;
pub const PR_RUNNER_ID: u64 = 0x1_0000_0120;
/// Console: a u64 load consumes one byte of stdin (-1 at end); a u64 store outputs `value & 0xff`.
pub const PR_CONSOLE_IN: u64 = 0x1_0000_0200;
pub const PR_CONSOLE_OUT: u64 = 0x1_0000_0208;
/// After a spawn: the child's stack base, stack size and id.
pub const PR_SPAWN_STACK_BASE: u64 = 0x1_0000_0400;
pub const PR_SPAWN_STACK_SIZE: u64 = 0x1_0000_0408;
pub const PR_SPAWN_ID: u64 = 0x1_0000_0410;
/// `int 0x80`: call number here, arguments and results in 8-byte slots at `PR_SYSCALL_ARGS`.
pub const PR_SYSCALL_ID: u64 = 0x1_0000_0420;
pub const PR_SYSCALL_ARGS: u64 = 0x1_0000_1000;

pub const PAGE_BYTES: u64 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_overlaps_name_the_first_area_and_the_overlap() {
        let areas = &RESERVED_AREAS;
        let free = 0x40_0000_0000;
        assert_eq!(first_reserved_overlap(areas, free, free + 4096), None);
        // Touching an area's end or start is not an overlap.
        assert_eq!(
            first_reserved_overlap(areas, HEAP_AREA.start - 8, HEAP_AREA.start),
            None
        );
        assert_eq!(
            first_reserved_overlap(areas, EXIT_RECORD_END, EXIT_RECORD_END + 8),
            None
        );
        let (area, overlap) =
            first_reserved_overlap(areas, HEAP_AREA.start - 8, HEAP_AREA.start + 8).expect("heap");
        assert_eq!(area.name, "heap area");
        assert_eq!(overlap, HEAP_AREA.start..HEAP_AREA.start + 8);
        // Spanning heap and stacks: the heap comes first.
        let (area, _) =
            first_reserved_overlap(areas, HEAP_AREA.end - 8, STACK_AREA.start + 8).expect("both");
        assert_eq!(area.name, "heap area");
        // The areas are at the same offsets in every space.
        let space5 = 5 << SPACE_SHIFT;
        let (area, overlap) = first_reserved_overlap(
            areas,
            space5 + STACK_AREA.start + 16,
            space5 + STACK_AREA.start + 32,
        )
        .expect("stack in space 5");
        assert_eq!(area.name, "stack area");
        assert_eq!(
            overlap,
            space5 + STACK_AREA.start + 16..space5 + STACK_AREA.start + 32
        );
        let (area, _) = first_reserved_overlap(areas, EXIT_RECORD_BASE, EXIT_RECORD_BASE + 1)
            .expect("exit records");
        assert_eq!(area.name, "exit-record area");
        assert_eq!(first_reserved_overlap(areas, 10, 10), None, "empty");
    }
}
