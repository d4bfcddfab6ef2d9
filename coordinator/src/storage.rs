//! The durable Raft log: raft-rs's [`Storage`] over two redb databases.
//!
//! ```text
//!   raft.redb       ── entries: u64 index → eraftpb::Entry (rust-protobuf bytes)
//!                   └─ meta:    "hard_state" | "conf_state" | "snapshot" (metadata only)
//!   snapshots.redb  ── snapshots: u64 index → state machine bytes (the newest two)
//!   memory          ── the log tail, hard state, conf state and latest snapshot, so raft-rs reads
//!                      never touch the disk
//! ```
//!
//! Snapshots live in their own database so a background thread can write a large one (redb allows one
//! writer per database) while the event loop keeps appending to the log. Snapshot data is durable
//! before the log's metadata points at it.
//!
//! Invariants:
//! - Every write is a redb transaction committed with `Durability::Immediate` (fsync) before the caller
//!   acknowledges or sends anything that depends on it. One Ready is one transaction, so one fsync.
//! - The memory copy is changed only after the transaction committed, so a failed write leaves both as
//!   they were.
//! - `first_index == snapshot.index + 1`; entries hold exactly `first_index..=last_index`, no gaps.
//!
//! The log is bounded by compaction: the node snapshots the state machine every
//! `snapshot_interval_entries` applied entries and drops the entries the snapshot covers.
//!
//! Left out: asynchronous entry fetching (raft-rs's `LogTemporarilyUnavailable`); the whole tail is in
//! memory, which compaction keeps small.

use std::cell::Cell;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::CoordinatorError;

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const HARD_STATE_KEY: &str = "hard_state";
const CONF_STATE_KEY: &str = "conf_state";
const SNAPSHOT_KEY: &str = "snapshot";
/// Compacted entries deleted per write at most, so compaction never stalls the log.
const COMPACTION_BATCH_ENTRIES: u64 = 512;

const SNAPSHOTS: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshots");

/// The databases one member keeps. Cloning shares them (a test restarts a node by reopening a clone).
#[derive(Clone)]
pub struct Databases {
    /// Small and hot: written, and fsynced, on every Ready.
    pub log: Arc<Database>,
    /// Large and rare: state machine snapshots.
    pub snapshots: Arc<Database>,
}

impl Databases {
    /// Opens (or creates) `raft.redb` and `snapshots.redb` in `directory`.
    pub fn open(directory: &Path) -> Result<Databases, CoordinatorError> {
        let open = |name: &str| {
            let path = directory.join(name);
            Database::create(&path)
                .map(Arc::new)
                .map_err(|error| CoordinatorError::Storage(format!("opening {}: {error}", path.display())))
        };
        Ok(Databases {
            log: open("raft.redb")?,
            snapshots: open("snapshots.redb")?,
        })
    }

    /// Databases kept in memory only, for tests.
    pub fn in_memory() -> Result<Databases, CoordinatorError> {
        let create = || {
            Database::builder()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .map(Arc::new)
                .map_err(storage_error)
        };
        Ok(Databases {
            log: create()?,
            snapshots: create()?,
        })
    }
}

/// Writes a snapshot's data, durably, and drops all but the newest earlier one (the log's metadata may
/// still point at it until the caller records this one). Runs on any thread.
pub fn save_snapshot_data(snapshots: &Database, index: u64, data: &[u8]) -> Result<(), CoordinatorError> {
    let mut transaction = snapshots.begin_write().map_err(storage_error)?;
    transaction
        .set_durability(Durability::Immediate)
        .map_err(|error| CoordinatorError::Storage(error.to_string()))?;
    {
        let mut table = transaction.open_table(SNAPSHOTS).map_err(storage_error)?;
        let newest = table.last().map_err(storage_error)?.map(|(key, _)| key.value());
        if let Some(newest) = newest {
            table.retain_in(..newest, |_, _| false).map_err(storage_error)?;
        }
        table.insert(index, data).map_err(storage_error)?;
    }
    transaction.commit().map_err(storage_error)
}

/// The Raft log, hard state, conf state and latest snapshot, durable in redb and mirrored in memory.
pub struct LogStore {
    databases: Databases,
    hard_state: HardState,
    conf_state: ConfState,
    /// The latest snapshot, data included: sent as is to followers that fell behind the compacted log.
    snapshot: Snapshot,
    /// Entries `snapshot.index + 1 ..= last_index`.
    entries: VecDeque<Entry>,
    /// Set when raft-rs asked for a snapshot the stored one cannot serve (too old, or taken before the
    /// receiver joined); the node takes a fresh one after its next apply.
    snapshot_wanted: Cell<bool>,
    /// The lowest index that may still be on disk below the snapshot; such entries are deleted a batch
    /// per write.
    stale_from: u64,
}

fn encode<M: protobuf::Message>(message: &M) -> Result<Vec<u8>, CoordinatorError> {
    message
        .write_to_bytes()
        .map_err(|error| CoordinatorError::Storage(format!("encoding a raft message: {error}")))
}

fn decode<M: protobuf::Message>(bytes: &[u8], what: &str) -> Result<M, CoordinatorError> {
    M::parse_from_bytes(bytes)
        .map_err(|error| CoordinatorError::Storage(format!("the stored {what} is corrupt: {error}")))
}

/// The snapshot as the log's metadata records it: everything but the data.
fn metadata_only(snapshot: &Snapshot) -> Snapshot {
    let mut recorded = Snapshot::default();
    recorded.set_metadata(snapshot.get_metadata().clone());
    recorded
}

impl LogStore {
    /// Loads the log, as after a restart (or creates an empty one).
    pub fn open(databases: Databases) -> Result<LogStore, CoordinatorError> {
        for database in [&databases.log, &databases.snapshots] {
            let transaction = database.begin_write().map_err(storage_error)?;
            transaction.open_table(ENTRIES).map_err(storage_error)?;
            transaction.open_table(META).map_err(storage_error)?;
            transaction.open_table(SNAPSHOTS).map_err(storage_error)?;
            transaction.commit().map_err(storage_error)?;
        }
        let transaction = databases.log.begin_read().map_err(storage_error)?;
        let meta = transaction.open_table(META).map_err(storage_error)?;
        let read_meta = |key: &str| -> Result<Option<Vec<u8>>, CoordinatorError> {
            Ok(meta
                .get(key)
                .map_err(storage_error)?
                .map(|value| value.value().to_vec()))
        };
        let mut hard_state = match read_meta(HARD_STATE_KEY)? {
            Some(bytes) => decode(&bytes, "hard state")?,
            None => HardState::default(),
        };
        let conf_state = match read_meta(CONF_STATE_KEY)? {
            Some(bytes) => decode(&bytes, "conf state")?,
            None => ConfState::default(),
        };
        let mut snapshot = match read_meta(SNAPSHOT_KEY)? {
            Some(bytes) => decode::<Snapshot>(&bytes, "snapshot")?,
            None => Snapshot::default(),
        };
        let snapshot_index = snapshot.get_metadata().index;
        if snapshot_index > 0 {
            let snapshots = databases.snapshots.begin_read().map_err(storage_error)?;
            let table = snapshots.open_table(SNAPSHOTS).map_err(storage_error)?;
            let data = table.get(snapshot_index).map_err(storage_error)?.ok_or_else(|| {
                CoordinatorError::Storage(format!(
                    "the log points at snapshot {snapshot_index}, which is missing from snapshots.redb"
                ))
            })?;
            snapshot.set_data(data.value().to_vec().into());
        }
        // A snapshot holds only committed state, so the commit index is at least its index.
        hard_state.commit = hard_state.commit.max(snapshot_index);
        let table = transaction.open_table(ENTRIES).map_err(storage_error)?;
        let mut entries = VecDeque::new();
        let first = snapshot_index + 1;
        for (expected, row) in (first..).zip(table.range(first..).map_err(storage_error)?) {
            let (index, bytes) = row.map_err(storage_error)?;
            if index.value() != expected {
                return Err(CoordinatorError::Storage(format!(
                    "the raft log has a gap: expected entry {expected}, found {}",
                    index.value()
                )));
            }
            entries.push_back(decode::<Entry>(bytes.value(), "log entry")?);
        }
        let stale_from = table
            .first()
            .map_err(storage_error)?
            .map_or(first, |(index, _)| index.value())
            .min(first);
        Ok(LogStore {
            databases,
            hard_state,
            conf_state,
            snapshot,
            entries,
            snapshot_wanted: Cell::new(false),
            stale_from,
        })
    }

    /// The databases, for the thread that saves snapshots and for tests that restart a node.
    pub fn databases(&self) -> &Databases {
        &self.databases
    }

    /// True when nothing was ever stored: a brand-new member.
    pub fn is_blank(&self) -> bool {
        self.conf_state.voters.is_empty()
            && self.conf_state.learners.is_empty()
            && self.entries.is_empty()
            && self.snapshot.get_metadata().index == 0
    }

    /// Writes the first configuration of a new cluster as a snapshot at index 1, term 1. Every founding
    /// member writes the same one. A member added later starts blank and receives this configuration
    /// (and the state) by snapshot, never by replaying a log that does not contain the founders.
    pub fn bootstrap(&mut self, voters: &[u64], state: Vec<u8>) -> Result<(), CoordinatorError> {
        assert!(self.is_blank(), "bootstrap of a log that already holds state");
        let conf_state = ConfState {
            voters: voters.to_vec(),
            ..ConfState::default()
        };
        let mut snapshot = Snapshot::default();
        snapshot.set_data(state.into());
        snapshot.mut_metadata().index = 1;
        snapshot.mut_metadata().term = 1;
        snapshot.mut_metadata().set_conf_state(conf_state.clone());
        let hard_state = HardState {
            term: 1,
            commit: 1,
            ..HardState::default()
        };
        self.persist(Some(&snapshot), &[], Some(&hard_state))
    }

    /// True once after raft-rs asked for a snapshot newer than the stored one.
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// The latest snapshot's metadata and data.
    pub fn latest_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    fn first(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    fn last(&self) -> u64 {
        self.snapshot.get_metadata().index + self.entries.len() as u64
    }

    /// Makes one Ready durable in one transaction: a snapshot from the leader, new entries (replacing
    /// any conflicting suffix), the hard state. Returns after the fsync.
    ///
    /// A Ready whose only change is a higher commit index is not written at all: the commit index is
    /// never relied on from disk (a restarted member learns it again from the leader), and skipping it
    /// keeps an fsync off the path between a write being committed and its client being answered. The
    /// latest commit index rides along with the next durable write.
    pub fn persist(
        &mut self,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), CoordinatorError> {
        let mut next_hard_state = self.hard_state.clone();
        if let Some(hard_state) = hard_state {
            next_hard_state = hard_state.clone();
        }
        if let Some(snapshot) = snapshot {
            let metadata = snapshot.get_metadata();
            next_hard_state.commit = next_hard_state.commit.max(metadata.index);
            next_hard_state.term = next_hard_state.term.max(metadata.term);
        }
        let vote_or_term_changed =
            next_hard_state.term != self.hard_state.term || next_hard_state.vote != self.hard_state.vote;
        if snapshot.is_none() && entries.is_empty() && !vote_or_term_changed {
            self.hard_state.commit = self.hard_state.commit.max(next_hard_state.commit);
            return Ok(());
        }
        // Where the new entries start, as seen after the snapshot (if any) is installed.
        let (base_first, base_entries_len) = match snapshot {
            Some(snapshot) => (snapshot.get_metadata().index + 1, 0u64),
            None => (self.first(), self.entries.len() as u64),
        };
        if let Some(first_new) = entries.first() {
            let next = base_first + base_entries_len;
            if first_new.index < base_first || first_new.index > next {
                return Err(CoordinatorError::Storage(format!(
                    "appending entries from index {} to a log holding {base_first}..{next}",
                    first_new.index
                )));
            }
        }
        let old_first = self.first();
        let old_last = self.last();
        let hard_state_bytes = encode(&next_hard_state)?;
        if let Some(snapshot) = snapshot {
            save_snapshot_data(
                &self.databases.snapshots,
                snapshot.get_metadata().index,
                snapshot.get_data(),
            )?;
        }
        self.write(|table, meta| {
            if let Some(snapshot) = snapshot {
                let index = snapshot.get_metadata().index;
                table
                    .retain_in(old_first..=old_last.max(index), |_, _| false)
                    .map_err(storage_error)?;
                meta.insert(SNAPSHOT_KEY, encode(&metadata_only(snapshot))?.as_slice())
                    .map_err(storage_error)?;
                meta.insert(
                    CONF_STATE_KEY,
                    encode(snapshot.get_metadata().get_conf_state())?.as_slice(),
                )
                .map_err(storage_error)?;
            }
            if let Some(first_new) = entries.first() {
                // Drop the conflicting suffix, then write the new entries.
                if first_new.index <= old_last {
                    table
                        .retain_in(first_new.index..=old_last, |_, _| false)
                        .map_err(storage_error)?;
                }
                for entry in entries {
                    table
                        .insert(entry.index, encode(entry)?.as_slice())
                        .map_err(storage_error)?;
                }
            }
            meta.insert(HARD_STATE_KEY, hard_state_bytes.as_slice())
                .map_err(storage_error)?;
            Ok(())
        })?;
        if let Some(snapshot) = snapshot {
            self.entries.clear();
            self.conf_state = snapshot.get_metadata().get_conf_state().clone();
            self.snapshot = snapshot.clone();
        }
        if let Some(first_new) = entries.first() {
            let keep = (first_new.index - self.first()) as usize;
            self.entries.truncate(keep);
            self.entries.extend(entries.iter().cloned());
        }
        self.hard_state = next_hard_state;
        Ok(())
    }

    /// Records a higher commit index in memory; it reaches the disk with the next durable write (see
    /// [`LogStore::persist`]).
    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = self.hard_state.commit.max(commit);
    }

    /// Records the configuration after a membership change was applied.
    pub fn set_conf_state(&mut self, conf_state: ConfState) -> Result<(), CoordinatorError> {
        let bytes = encode(&conf_state)?;
        self.write(|_, meta| {
            meta.insert(CONF_STATE_KEY, bytes.as_slice()).map_err(storage_error)?;
            Ok(())
        })?;
        self.conf_state = conf_state;
        Ok(())
    }

    /// Records a snapshot of the state machine taken at `index` (already applied), whose data
    /// [`save_snapshot_data`] already made durable, and drops the log entries it covers. A snapshot no
    /// newer than the current one (a leader's arrived meanwhile) is ignored.
    pub fn record_snapshot(
        &mut self,
        index: u64,
        conf_state: ConfState,
        data: Vec<u8>,
    ) -> Result<(), CoordinatorError> {
        if index <= self.snapshot.get_metadata().index {
            return Ok(());
        }
        if index > self.last() {
            return Err(CoordinatorError::Storage(format!(
                "snapshot at index {index} is past the last log entry {}",
                self.last()
            )));
        }
        let term = self.term_of(index)?;
        let mut snapshot = Snapshot::default();
        let metadata = snapshot.mut_metadata();
        metadata.index = index;
        metadata.term = term;
        metadata.set_conf_state(conf_state);
        let bytes = encode(&snapshot)?;
        // The stored commit index must never be below the snapshot: a restart applies from the snapshot.
        let hard_state_bytes = encode(&self.hard_state)?;
        let first = self.first();
        // The covered entries are left for later writes to delete a batch at a time (see `write`):
        // deleting thousands here would stall the event loop.
        self.write(|_, meta| {
            meta.insert(SNAPSHOT_KEY, bytes.as_slice()).map_err(storage_error)?;
            meta.insert(HARD_STATE_KEY, hard_state_bytes.as_slice())
                .map_err(storage_error)?;
            Ok(())
        })?;
        let drop = (index + 1 - first) as usize;
        self.entries.drain(..drop);
        snapshot.set_data(data.into());
        self.snapshot = snapshot;
        Ok(())
    }

    fn term_of(&self, index: u64) -> Result<u64, CoordinatorError> {
        self.term(index)
            .map_err(|error| CoordinatorError::Storage(format!("term of entry {index}: {error}")))
    }

    /// One redb write transaction, committed with `Durability::Immediate`: fsynced when this returns.
    /// It also deletes up to [`COMPACTION_BATCH_ENTRIES`] entries a snapshot already covers.
    fn write(
        &mut self,
        body: impl FnOnce(&mut redb::Table<u64, &[u8]>, &mut redb::Table<&str, &[u8]>) -> Result<(), CoordinatorError>,
    ) -> Result<(), CoordinatorError> {
        // Entries below the snapshot are covered by it and may go.
        let stale_end = self.first().min(self.stale_from + COMPACTION_BATCH_ENTRIES);
        let mut transaction = self.databases.log.begin_write().map_err(storage_error)?;
        transaction
            .set_durability(Durability::Immediate)
            .map_err(|error| CoordinatorError::Storage(error.to_string()))?;
        {
            let mut table = transaction.open_table(ENTRIES).map_err(storage_error)?;
            let mut meta = transaction.open_table(META).map_err(storage_error)?;
            body(&mut table, &mut meta)?;
            if stale_end > self.stale_from {
                table
                    .retain_in(self.stale_from..stale_end, |_, _| false)
                    .map_err(storage_error)?;
            }
        }
        transaction.commit().map_err(storage_error)?;
        self.stale_from = self.stale_from.max(stale_end);
        Ok(())
    }
}

fn storage_error(error: impl Into<redb::Error>) -> CoordinatorError {
    CoordinatorError::Storage(error.into().to_string())
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let offset = self.first();
        let mut selected = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        for entry in self.entries.range((low - offset) as usize..(high - offset) as usize) {
            size += u64::from(entry.compute_size());
            // Always return at least one entry, as raft-rs requires.
            if !selected.is_empty() && size > max_size {
                break;
            }
            selected.push(entry.clone());
        }
        Ok(selected)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let snapshot_index = self.snapshot.get_metadata().index;
        if index == snapshot_index {
            return Ok(self.snapshot.get_metadata().term);
        }
        if index < snapshot_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self.entries.get((index - snapshot_index - 1) as usize) {
            Some(entry) => Ok(entry.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let metadata = self.snapshot.get_metadata();
        let conf_state = metadata.get_conf_state();
        // A member cannot install a snapshot whose configuration does not include it.
        let includes_receiver = conf_state.voters.contains(&to) || conf_state.learners.contains(&to);
        if metadata.index < request_index || !includes_receiver {
            self.snapshot_wanted.set(true);
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; 3].into(),
            ..Entry::default()
        }
    }

    #[test]
    fn survives_reopen_and_truncates_conflicts() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path();
        {
            let mut store = LogStore::open(Databases::open(path).unwrap()).unwrap();
            store.bootstrap(&[1, 2, 3], Vec::new()).unwrap();
            let entries: Vec<Entry> = (2..=5).map(|index| entry(index, 1)).collect();
            let hard_state = HardState {
                term: 1,
                commit: 3,
                ..HardState::default()
            };
            store.persist(None, &entries, Some(&hard_state)).unwrap();
            // A new leader overwrites entries 4 and 5.
            store.persist(None, &[entry(4, 2)], None).unwrap();
            assert_eq!(store.last_index().unwrap(), 4);
        }
        let store = LogStore::open(Databases::open(path).unwrap()).unwrap();
        assert_eq!(store.last_index().unwrap(), 4);
        assert_eq!(store.term(4).unwrap(), 2);
        assert_eq!(store.hard_state().commit, 3);
        assert_eq!(store.conf_state().voters, vec![1, 2, 3]);
    }

    #[test]
    fn compaction_keeps_the_snapshot_and_the_tail() {
        let databases = Databases::in_memory().unwrap();
        let mut store = LogStore::open(databases.clone()).unwrap();
        store.bootstrap(&[1], Vec::new()).unwrap();
        assert_eq!(store.first_index().unwrap(), 2);
        let entries: Vec<Entry> = (2..=10).map(|index| entry(index, 1)).collect();
        store.persist(None, &entries, None).unwrap();
        let conf_state = ConfState {
            voters: vec![1, 2],
            ..ConfState::default()
        };
        save_snapshot_data(&databases.snapshots, 6, b"state").unwrap();
        store.record_snapshot(6, conf_state, b"state".to_vec()).unwrap();
        let store = LogStore::open(databases).unwrap();
        assert_eq!(store.first_index().unwrap(), 7);
        assert_eq!(store.last_index().unwrap(), 10);
        assert_eq!(store.term(6).unwrap(), 1);
        assert!(matches!(
            store.entries(5, 8, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(
            store
                .entries(7, 11, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            4
        );
        assert_eq!(store.snapshot(0, 2).unwrap().get_data(), b"state");
        // The covered entries leave the disk with the next write, not in the snapshot's own.
        let on_disk = |databases: &Databases| {
            let transaction = databases.log.begin_read().unwrap();
            let table = transaction.open_table(ENTRIES).unwrap();
            table
                .range(0..)
                .unwrap()
                .map(|row| row.unwrap().0.value())
                .collect::<Vec<u64>>()
        };
        assert_eq!(on_disk(store.databases()).first(), Some(&2));
        let mut store = store;
        store.persist(None, &[entry(11, 1)], None).unwrap();
        assert_eq!(on_disk(store.databases()), (7..=11).collect::<Vec<u64>>());
        // A member the snapshot's configuration does not know needs a newer one.
        assert!(store.snapshot(0, 3).is_err());
        assert!(store.take_snapshot_wanted());
        assert!(!store.take_snapshot_wanted());
    }

    #[test]
    fn a_commit_only_change_is_not_written_but_rides_along() {
        let directory = tempfile::tempdir().unwrap();
        let open = || LogStore::open(Databases::open(directory.path()).unwrap()).unwrap();
        let mut store = open();
        store.bootstrap(&[1], Vec::new()).unwrap();
        store.persist(None, &[entry(2, 1), entry(3, 1)], None).unwrap();
        store.set_commit(3);
        drop(store);
        assert_eq!(open().hard_state().commit, 1, "commit alone is not fsynced");
        let mut store = open();
        store.set_commit(3);
        store.persist(None, &[entry(4, 1)], None).unwrap();
        drop(store);
        assert_eq!(open().hard_state().commit, 3, "it rides with the next write");
    }
}
