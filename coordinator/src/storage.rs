//! The durable Raft log: raft-rs's [`Storage`] over a redb database.
//!
//! ```text
//!   redb file  ── entries: u64 index → eraftpb::Entry (rust-protobuf bytes)
//!              └─ meta:    "hard_state" | "conf_state" | "snapshot" → rust-protobuf bytes
//!   memory     ── the same log tail, hard state, conf state and latest snapshot, so raft-rs reads
//!                 never touch the disk
//! ```
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
use redb::{Database, Durability, ReadableDatabase, TableDefinition};

use crate::error::CoordinatorError;

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const HARD_STATE_KEY: &str = "hard_state";
const CONF_STATE_KEY: &str = "conf_state";
const SNAPSHOT_KEY: &str = "snapshot";

/// The Raft log, hard state, conf state and latest snapshot, durable in redb and mirrored in memory.
pub struct LogStore {
    database: Arc<Database>,
    hard_state: HardState,
    conf_state: ConfState,
    /// The latest snapshot, data included: sent as is to followers that fell behind the compacted log.
    snapshot: Snapshot,
    /// Entries `snapshot.index + 1 ..= last_index`.
    entries: VecDeque<Entry>,
    /// Set when raft-rs asked for a snapshot the stored one cannot serve (too old, or taken before the
    /// receiver joined); the node takes a fresh one after its next apply.
    snapshot_wanted: Cell<bool>,
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

impl LogStore {
    /// Opens (or creates) the log at `path`.
    pub fn open(path: &Path) -> Result<LogStore, CoordinatorError> {
        let database = Database::create(path)
            .map_err(|error| CoordinatorError::Storage(format!("opening the raft log {}: {error}", path.display())))?;
        LogStore::from_database(Arc::new(database))
    }

    /// A log kept in memory only; for tests that restart nodes by reopening the same database.
    pub fn in_memory_database() -> Result<Arc<Database>, CoordinatorError> {
        let database = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(storage_error)?;
        Ok(Arc::new(database))
    }

    /// Loads the log from an open database, as after a restart.
    pub fn from_database(database: Arc<Database>) -> Result<LogStore, CoordinatorError> {
        {
            let transaction = database.begin_write().map_err(storage_error)?;
            transaction.open_table(ENTRIES).map_err(storage_error)?;
            transaction.open_table(META).map_err(storage_error)?;
            transaction.commit().map_err(storage_error)?;
        }
        let transaction = database.begin_read().map_err(storage_error)?;
        let meta = transaction.open_table(META).map_err(storage_error)?;
        let read_meta = |key: &str| -> Result<Option<Vec<u8>>, CoordinatorError> {
            Ok(meta
                .get(key)
                .map_err(storage_error)?
                .map(|value| value.value().to_vec()))
        };
        let hard_state = match read_meta(HARD_STATE_KEY)? {
            Some(bytes) => decode(&bytes, "hard state")?,
            None => HardState::default(),
        };
        let conf_state = match read_meta(CONF_STATE_KEY)? {
            Some(bytes) => decode(&bytes, "conf state")?,
            None => ConfState::default(),
        };
        let snapshot = match read_meta(SNAPSHOT_KEY)? {
            Some(bytes) => decode(&bytes, "snapshot")?,
            None => Snapshot::default(),
        };
        let mut hard_state = hard_state;
        // A snapshot holds only committed state, so the commit index is at least its index.
        hard_state.commit = hard_state.commit.max(snapshot.get_metadata().index);
        let table = transaction.open_table(ENTRIES).map_err(storage_error)?;
        let mut entries = VecDeque::new();
        let first = snapshot.get_metadata().index + 1;
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
        Ok(LogStore {
            database,
            hard_state,
            conf_state,
            snapshot,
            entries,
            snapshot_wanted: Cell::new(false),
        })
    }

    /// The database, so a test can "restart" a node by loading it again.
    pub fn database(&self) -> Arc<Database> {
        Arc::clone(&self.database)
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
        self.write(|table, meta| {
            if let Some(snapshot) = snapshot {
                let index = snapshot.get_metadata().index;
                table
                    .retain_in(old_first..=old_last.max(index), |_, _| false)
                    .map_err(storage_error)?;
                meta.insert(SNAPSHOT_KEY, encode(snapshot)?.as_slice())
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

    /// Stores a snapshot of the state machine taken at `index` (already applied) and drops the log
    /// entries it covers.
    pub fn compact_to_snapshot(
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
        snapshot.set_data(data.into());
        let metadata = snapshot.mut_metadata();
        metadata.index = index;
        metadata.term = term;
        metadata.set_conf_state(conf_state);
        let bytes = encode(&snapshot)?;
        // The stored commit index must never be below the snapshot: a restart applies from the snapshot.
        let hard_state_bytes = encode(&self.hard_state)?;
        let first = self.first();
        self.write(|table, meta| {
            meta.insert(SNAPSHOT_KEY, bytes.as_slice()).map_err(storage_error)?;
            meta.insert(HARD_STATE_KEY, hard_state_bytes.as_slice())
                .map_err(storage_error)?;
            table.retain_in(first..=index, |_, _| false).map_err(storage_error)?;
            Ok(())
        })?;
        let drop = (index + 1 - first) as usize;
        self.entries.drain(..drop);
        self.snapshot = snapshot;
        Ok(())
    }

    fn term_of(&self, index: u64) -> Result<u64, CoordinatorError> {
        self.term(index)
            .map_err(|error| CoordinatorError::Storage(format!("term of entry {index}: {error}")))
    }

    /// One redb write transaction, committed with `Durability::Immediate`: fsynced when this returns.
    fn write(
        &self,
        body: impl FnOnce(&mut redb::Table<u64, &[u8]>, &mut redb::Table<&str, &[u8]>) -> Result<(), CoordinatorError>,
    ) -> Result<(), CoordinatorError> {
        let mut transaction = self.database.begin_write().map_err(storage_error)?;
        transaction
            .set_durability(Durability::Immediate)
            .map_err(|error| CoordinatorError::Storage(error.to_string()))?;
        {
            let mut table = transaction.open_table(ENTRIES).map_err(storage_error)?;
            let mut meta = transaction.open_table(META).map_err(storage_error)?;
            body(&mut table, &mut meta)?;
        }
        transaction.commit().map_err(storage_error)
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
        let path = directory.path().join("raft.redb");
        {
            let mut store = LogStore::open(&path).unwrap();
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
        let store = LogStore::open(&path).unwrap();
        assert_eq!(store.last_index().unwrap(), 4);
        assert_eq!(store.term(4).unwrap(), 2);
        assert_eq!(store.hard_state().commit, 3);
        assert_eq!(store.conf_state().voters, vec![1, 2, 3]);
    }

    #[test]
    fn compaction_keeps_the_snapshot_and_the_tail() {
        let database = LogStore::in_memory_database().unwrap();
        let mut store = LogStore::from_database(Arc::clone(&database)).unwrap();
        store.bootstrap(&[1], Vec::new()).unwrap();
        assert_eq!(store.first_index().unwrap(), 2);
        let entries: Vec<Entry> = (2..=10).map(|index| entry(index, 1)).collect();
        store.persist(None, &entries, None).unwrap();
        let conf_state = ConfState {
            voters: vec![1, 2],
            ..ConfState::default()
        };
        store.compact_to_snapshot(6, conf_state, b"state".to_vec()).unwrap();
        let store = LogStore::from_database(database).unwrap();
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
        // A member the snapshot's configuration does not know needs a newer one.
        assert!(store.snapshot(0, 3).is_err());
        assert!(store.take_snapshot_wanted());
        assert!(!store.take_snapshot_wanted());
    }

    #[test]
    fn a_commit_only_change_is_not_written_but_rides_along() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("raft.redb");
        let mut store = LogStore::open(&path).unwrap();
        store.bootstrap(&[1], Vec::new()).unwrap();
        store.persist(None, &[entry(2, 1), entry(3, 1)], None).unwrap();
        store.set_commit(3);
        drop(store);
        assert_eq!(
            LogStore::open(&path).unwrap().hard_state().commit,
            1,
            "commit alone is not fsynced"
        );
        let mut store = LogStore::open(&path).unwrap();
        store.set_commit(3);
        store.persist(None, &[entry(4, 1)], None).unwrap();
        drop(store);
        assert_eq!(
            LogStore::open(&path).unwrap().hard_state().commit,
            3,
            "it rides with the next write"
        );
    }
}
