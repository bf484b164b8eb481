//! The holder role: reads, prepares, installs and aborts of the pages this node holds.
//!
//! A prepare's deltas for a page this node is home of are conflict-checked and held as
//! intents in the store; for a page it backs up they are **staged**: kept without a check, to
//! be installed when node 0 commits the transaction. A backup becomes a page's home when the
//! home dies (`crate::view`); its staged deltas then stand for the intents lost with the old
//! home: a prepare at the new home is refused if it stores a byte a staged delta of another
//! undecided transaction stores (`staged_conflict`), exactly as an intent would refuse it.

use super::{Node, NodeId};
use crate::msg::{Msg, PageDelta};
use dvm_engine::page::Mask;
use dvm_engine::store::{Conflict, ConflictWith, PageBytes, PageWrite, Publication, TxnId};
use dvm_transport::verbs::published::Previous;

/// What a holder decided about a transaction; kept so that retried messages get the same
/// answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Decided {
    Committed,
    Refused(Conflict),
    Aborted,
}

/// A prepared transaction this node holds deltas of.
pub(super) struct Held {
    coordinator: NodeId,
    /// Checked here, with intents in the store.
    intents: Vec<PageWrite>,
    /// Kept here as a backup.
    staged: Vec<PageWrite>,
}

impl Held {
    pub(super) fn coordinator(&self) -> NodeId {
        self.coordinator
    }
}

/// The first byte both masks select.
fn first_common_byte(a: &Mask, b: &Mask) -> Option<usize> {
    a.iter()
        .zip(b.iter())
        .enumerate()
        .find(|(_, (x, y))| **x & **y != 0)
        .map(|(word, (x, y))| word * 64 + (x & y).trailing_zeros() as usize)
}

impl Node {
    /// Writes `page`'s newest installed version into the published table (or that it has
    /// none: zeros, at timestamp 0). The store is read under the table's lock, so of two
    /// publications of a page the later one read the store later: the slot never goes back to
    /// a version older than one already installed and published.
    ///
    /// With it goes the version just below the newest when it differs from the newest in few
    /// bytes (an exit record, a counter) or there is none, so that a reader whose snapshot lies
    /// between the two READs it too (`published::Previous`).
    pub(super) fn publish_newest(&self, page: u64) {
        if let Some(table) = &self.published {
            table.publish_with_previous(page, || {
                Some(match self.store.read_version(page, u64::MAX).version {
                    Some((ts, data)) => {
                        let previous = match self.store.version_below(page, ts) {
                            Some(Some((below, older))) => Previous::between(below, &older, &data),
                            Some(None) => Previous::NoVersion,
                            None => Previous::Unknown,
                        };
                        (ts, Some(data), previous)
                    }
                    None => (0, None, Previous::Unknown),
                })
            });
        }
    }

    pub(super) fn home_read(&mut self, from: NodeId, req: u64, page: u64, snapshot_ts: u64) {
        // Pages loaded at timestamp 0 are published when first asked for, so the next reader
        // of this page (on any node) READs it.
        self.publish_newest(page);
        let found = self.store.read_version(page, snapshot_ts);
        // Every timestamp at or below the watermark is installed at every live holder, this
        // one included, so with no newer version installed, none can appear at or below it.
        let valid_to = match found.next_ts {
            Some(next) => next - 1,
            None => snapshot_ts.max(self.watermark),
        };
        let (version_ts, data) = match found.version {
            Some((ts, data)) => (ts, Some(data)),
            None => (0, None),
        };
        let msg = Msg::ReadReply {
            req,
            page,
            version_ts,
            valid_to,
            data,
        };
        self.send(from, msg);
    }

    pub(super) fn home_prepare(
        &mut self,
        from: NodeId,
        txn: TxnId,
        epoch: u64,
        snapshot_ts: u64,
        deltas: Vec<PageDelta>,
    ) {
        // Not ahead of this node's view: behind the coordinator, this node could take itself
        // for a backup of a page it is now home of, and skip the check. It answers once it
        // has the view (node 0 sends it with heartbeats; the prepare is retried). Behind this
        // node, the prepare is handled by this node's view: a holder's pages only gain
        // holders at the end of their rings, so this node holds what it was sent and checks
        // what it is now home of; a holder the coordinator's view lacked gets the deltas
        // before node 0 grants (`Reprepare`, `seeding.rs`).
        if epoch > self.view.epoch() {
            return;
        }
        let answer = match self.decided.get(&txn) {
            Some(Decided::Refused(conflict)) => Msg::Refused {
                txn,
                conflict: *conflict,
            },
            Some(Decided::Aborted) => Msg::Aborted { txn },
            Some(Decided::Committed) => Msg::Prepared { txn },
            None if self.held.contains_key(&txn) => match self.stage_more(txn, &deltas) {
                Ok(()) => Msg::Prepared { txn },
                Err(conflict) => Msg::Refused { txn, conflict },
            },
            None => match self.prepare_here(from, txn, snapshot_ts, &deltas) {
                Ok(held) => {
                    for write in &held.staged {
                        self.staged_pages.entry(write.key).or_default().insert(txn);
                    }
                    self.held.insert(txn, held);
                    Msg::Prepared { txn }
                }
                Err(conflict) => {
                    self.decided.insert(txn, Decided::Refused(conflict));
                    Msg::Refused { txn, conflict }
                }
            },
        };
        self.send(from, answer);
    }

    /// Page writes of deltas: zeros with the stored bytes in place (only those are installed).
    fn writes_of(&self, txn: TxnId, deltas: &[PageDelta]) -> Result<Vec<PageWrite>, Conflict> {
        let mut writes = Vec::with_capacity(deltas.len());
        for delta in deltas {
            // Out of page memory at a holder: the commit cannot be held, so it is refused as
            // if it conflicted with itself at the page's first byte.
            let mut data = self.pages.zeroed().map_err(|_| Conflict {
                key: delta.page,
                offset: 0,
                with: ConflictWith::Prepared { txn },
            })?;
            delta.to_page(&mut data);
            writes.push(PageWrite {
                key: delta.page,
                data,
                stored: delta.mask.clone(),
            });
        }
        Ok(writes)
    }

    fn prepare_here(
        &self,
        coordinator: NodeId,
        txn: TxnId,
        snapshot_ts: u64,
        deltas: &[PageDelta],
    ) -> Result<Held, Conflict> {
        let me = self.config.id;
        let (mine, backed): (Vec<PageDelta>, Vec<PageDelta>) = deltas
            .iter()
            .cloned()
            .partition(|delta| self.view.home(delta.page) == Some(me));
        let intents = self.writes_of(txn, &mine)?;
        if !self.config.broken_skip_conflict_check {
            for write in &intents {
                self.staged_conflict(txn, write)?;
            }
            self.store.prepare(txn, snapshot_ts, &intents)?;
        }
        let staged = self.writes_of(txn, &backed)?;
        Ok(Held {
            coordinator,
            intents,
            staged,
        })
    }

    /// A prepare of a transaction held here already: a repeated one (nothing new), or one
    /// restaged after this node joined the ring of more of its pages (`seeding.rs`), whose
    /// new deltas are kept like a backup's.
    fn stage_more(&mut self, txn: TxnId, deltas: &[PageDelta]) -> Result<(), Conflict> {
        let Some(held) = self.held.get(&txn) else {
            return Ok(());
        };
        let holds = |page: u64| {
            let mut writes = held.intents.iter().chain(held.staged.iter());
            writes.any(|write| write.key == page)
        };
        let new: Vec<PageDelta> = deltas.iter().filter(|d| !holds(d.page)).cloned().collect();
        if new.is_empty() {
            return Ok(());
        }
        let writes = self.writes_of(txn, &new)?;
        for write in &writes {
            self.staged_pages.entry(write.key).or_default().insert(txn);
        }
        if let Some(held) = self.held.get_mut(&txn) {
            held.staged.extend(writes);
        }
        Ok(())
    }

    /// A byte `write` stores that an undecided transaction staged here also stores: such a
    /// transaction held an intent on it at a home that died, and may yet commit.
    fn staged_conflict(&self, txn: TxnId, write: &PageWrite) -> Result<(), Conflict> {
        let Some(others) = self.staged_pages.get(&write.key) else {
            return Ok(());
        };
        for other in others.iter().filter(|other| **other != txn) {
            let Some(held) = self.held.get(other) else {
                continue;
            };
            for staged in held.staged.iter().filter(|s| s.key == write.key) {
                if let Some(offset) = first_common_byte(&staged.stored, &write.stored) {
                    return Err(Conflict {
                        key: write.key,
                        offset,
                        with: ConflictWith::Prepared { txn: *other },
                    });
                }
            }
        }
        Ok(())
    }

    fn unstage(&mut self, txn: TxnId, held: &Held) {
        for write in &held.staged {
            if let Some(txns) = self.staged_pages.get_mut(&write.key) {
                txns.remove(&txn);
                if txns.is_empty() {
                    self.staged_pages.remove(&write.key);
                }
            }
        }
    }

    pub(super) fn home_commit(
        &mut self,
        from: NodeId,
        txn: TxnId,
        first: u64,
        last: u64,
        forced: Vec<PageDelta>,
    ) {
        match self.decided.get(&txn) {
            Some(Decided::Committed) => {}
            Some(_) => {
                debug_assert!(false, "commit of txn {txn}, refused or aborted here");
                return;
            }
            None => {
                let mut installed: Vec<u64> = forced.iter().map(|delta| delta.page).collect();
                if let Some(held) = self.held.remove(&txn) {
                    self.unstage(txn, &held);
                    installed.extend(held.intents.iter().map(|write| write.key));
                    installed.extend(held.staged.iter().map(|write| write.key));
                    let mut unchecked = held.staged;
                    if self.config.broken_skip_conflict_check {
                        unchecked.extend(held.intents);
                    } else {
                        self.store
                            .commit(txn, None, first, held.intents, &self.pages);
                    }
                    for write in unchecked {
                        let publication = Publication::Page {
                            write,
                            base_ts: None,
                        };
                        self.store.publish(first, publication, &self.pages);
                    }
                }
                // An exit record: a few bytes go without a page; if the page memory a larger
                // one needs cannot be had, the record is lost but the run goes on (as on one
                // node).
                for delta in &forced {
                    let publication =
                        match PageBytes::from_mask(delta.page, &delta.mask, &delta.bytes) {
                            Some(bytes) => Publication::Bytes(bytes),
                            None => match self.writes_of(txn, std::slice::from_ref(delta)) {
                                Ok(mut writes) if writes.len() == 1 => Publication::Page {
                                    write: writes.remove(0),
                                    base_ts: None,
                                },
                                _ => continue,
                            },
                        };
                    self.store.publish(last, publication, &self.pages);
                }
                // Before `Installed` leaves: a snapshot that includes this commit is taken
                // only after every holder acknowledged it, so its readers find it published.
                installed.sort_unstable();
                installed.dedup();
                for page in installed {
                    self.publish_newest(page);
                }
                self.decided.insert(txn, Decided::Committed);
            }
        }
        self.send(from, Msg::Installed { txn });
    }

    pub(super) fn home_abort(&mut self, from: NodeId, txn: TxnId) {
        self.release(txn);
        self.send(from, Msg::Aborted { txn });
    }

    /// Drops what this node holds of `txn`, for good.
    fn release(&mut self, txn: TxnId) {
        if let Some(held) = self.held.remove(&txn) {
            self.unstage(txn, &held);
            if !self.config.broken_skip_conflict_check {
                self.store.abort(txn, held.intents.iter().map(|w| w.key));
            }
        }
        debug_assert_ne!(self.decided.get(&txn), Some(&Decided::Committed));
        self.decided.entry(txn).or_insert(Decided::Aborted);
    }

    /// A newer view: transactions held here whose coordinator died are released at once,
    /// except those node 0 granted (`granted`): it is installing those, and their `Commit`
    /// comes. Released before anything else of the view is acted on, so a runner of the dead
    /// node that runs again never finds its own first attempt's intents in its way.
    pub(super) fn home_on_view(&mut self, granted: &[TxnId]) {
        let orphans: Vec<TxnId> = self
            .held
            .iter()
            .filter(|(txn, held)| !self.view.is_live(held.coordinator) && !granted.contains(txn))
            .map(|(txn, _)| *txn)
            .collect();
        for txn in orphans {
            self.release(txn);
        }
        // Nothing else to hand over: a backup that became home already holds every version
        // at or below the watermark and, staged, what the old home held as intents.
    }
}
