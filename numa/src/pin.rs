//! Pinning the calling thread to one OS processor (PU) with `core_affinity`.
//!
//! Invariant: a call either leaves the thread's affinity mask equal to exactly `{pu}` and
//! returns `Ok`, or leaves it unchanged and returns an error that says why; it never panics,
//! whatever the id.

use std::io;

use crate::error::PinError;

/// Number of processor ids a Linux `cpu_set_t` can hold. `core_affinity` indexes its mask with
/// the id unchecked, so larger ids would panic inside it: they are rejected here first.
fn affinity_mask_limit() -> usize {
    usize::try_from(libc::CPU_SETSIZE).unwrap_or(1024)
}

/// Pin the calling thread to the OS processor `pu` (the ids of [`crate::Core::pus`], as
/// `sched_setaffinity` numbers them).
///
/// # Errors
/// [`PinError::OutOfRange`] if `pu` cannot be put in an affinity mask,
/// [`PinError::Unavailable`] if the kernel does not know that processor or this process may not
/// use it, [`PinError::Refused`] for any other refusal. On error the affinity is unchanged.
pub fn pin_current_thread(pu: u32) -> Result<(), PinError> {
    let limit = affinity_mask_limit();
    let id = match usize::try_from(pu) {
        Ok(id) if id < limit => id,
        _ => return Err(PinError::OutOfRange { pu, limit }),
    };
    if core_affinity::set_for_current(core_affinity::CoreId { id }) {
        return Ok(());
    }
    // core_affinity only reports a bool; sched_setaffinity's errno is still this thread's last
    // error because nothing else ran in between.
    let source = io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EINVAL) {
        Err(PinError::Unavailable { pu, source })
    } else {
        Err(PinError::Refused { pu, source })
    }
}

/// The OS processor ids the calling thread may currently run on, ascending, or `None` if the
/// kernel would not say. After a successful [`pin_current_thread`]`(pu)` this is `[pu]`.
pub fn current_thread_pus() -> Option<Vec<u32>> {
    let ids = core_affinity::get_core_ids()?;
    Some(
        ids.into_iter()
            .filter_map(|core| u32::try_from(core.id).ok())
            .collect(),
    )
}
