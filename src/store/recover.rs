//! Opening the log after a crash: what the write-ahead log holds beyond sled
//! is written into sled again, and the marks that say how far each part got.

use super::*;

/// What replaying the write-ahead log builds up.
struct Replay {
    writes: Writes,
    /// The highest id seen.
    last: u64,
    replayed: usize,
    /// The most an id ran ahead of its receive time.
    lead_ms: u64,
    /// Each target's watermark event types as stored (`None`: no
    /// watermark; `Some(None)`: every type), read once.
    fronts: std::collections::HashMap<String, Option<Option<Vec<String>>>>,
}

impl Store {
    /// Puts what the write-ahead log holds beyond sled's highest id into
    /// sled (a crash came before the checkpoint), makes sled durable, and
    /// empties the write-ahead log.
    pub(super) fn recover(
        &self,
        entries: Vec<wal::Entry>,
        last_old: u64,
    ) -> Result<(), StoreError> {
        if last_old == 0 {
            return Ok(());
        }
        // sled applies a group commit key by key, its `m/last_id` last: a
        // group above that mark may be in sled in part (keys of later
        // events included), so it is written again whole.
        // Frames up to the last checkpoint's mark are durable in sled; those
        // above it are written again whole, also those sled already had
        // (identical keys and values): a power cut may have taken a large
        // event's blob from under them. A log from before the mark existed
        // replays every frame.
        let durable = self.durable_through()?;
        let mut replay = Replay {
            writes: Writes::default(),
            last: self.recover_last_id()?,
            replayed: 0,
            lead_ms: self.id_lead_ms()?,
            fronts: std::collections::HashMap::new(),
        };
        for entry in entries.iter().filter(|e| e.id > durable) {
            match entry.kind {
                wal::KIND_EVENT => self.replay_event(&mut replay, entry)?,
                _ => replay
                    .writes
                    .insert(&id_key(QUARANTINE_PREFIX, entry.id), entry.value.as_slice()),
            }
            replay.last = replay.last.max(entry.id);
            replay.replayed += 1;
        }
        let Replay {
            mut writes,
            last,
            replayed,
            lead_ms,
            ..
        } = replay;
        writes.insert(META_LAST_ID, &last.to_be_bytes());
        if lead_ms > ID_CLOCK_MARGIN_MS {
            writes.insert(META_ID_LEAD, &lead_ms.to_be_bytes());
        }
        let io = |source: std::io::Error| StoreError::DataFile {
            path: self.dir.clone(),
            source,
        };
        self.db.apply_batch(writes.into_batch())?;
        self.db.flush()?;
        File::open(self.dir.join("db"))
            .and_then(|f| f.sync_data())
            .map_err(io)?;
        // Every blob file, not only this run's: the process that crashed may
        // have left some unsynced, vouched for by no checkpoint.
        sync_recent_blobs(&self.dir, UNIX_EPOCH).map_err(io)?;
        // Everything through `last` is synced: the mark (see `make_durable`).
        self.db.insert(META_DURABLE_ID, &last.to_be_bytes())?;
        wal::remove_through(&self.dir, last_old).map_err(io)?;
        if replayed > 0 {
            tracing::info!(
                replayed,
                "recovered acknowledged events from the write-ahead log"
            );
        }
        Ok(())
    }

    /// An event's record again, and a queue entry for each of its targets
    /// that needs one.
    fn replay_event(&self, replay: &mut Replay, entry: &wal::Entry) -> Result<(), StoreError> {
        let key = id_key(EVENT_PREFIX, entry.id);
        let record = decode_event_record(&key, &entry.value)?;
        let received_at_ms = record.received_at_ms;
        let lead_ms = crate::node::id_ms(entry.id).saturating_sub(received_at_ms);
        replay.lead_ms = replay.lead_ms.max(lead_ms);
        replay.writes.insert(&key, entry.value.as_slice());
        let state = new_delivery_state(received_at_ms);
        for target in &entry.targets {
            // A target whose types a reload changed, and which crashed
            // before the new watermark was written, still has the old one.
            if !replay.fronts.contains_key(target) {
                let stored = self.stored_watermark(target)?.map(|stored| stored.events);
                replay.fronts.insert(target.clone(), stored);
            }
            let front = replay.fronts[target].as_ref().map(Option::as_deref);
            if needs_queue_entry(front, record.event) {
                let id = EventId(entry.id);
                replay.writes.queue_new(target, received_at_ms, id, &state);
            }
        }
        Ok(())
    }

    /// The id of the last group commit sled has every write of.
    /// See [`META_DURABLE_ID`]; 0 when no checkpoint has set it yet.
    pub(super) fn durable_through(&self) -> Result<u64, StoreError> {
        Ok(match self.db.get(META_DURABLE_ID)? {
            Some(v) => decode_u64(&v).unwrap_or(0),
            None => 0,
        })
    }

    /// See [`META_ID_LEAD`]; 0 when ids never ran that far ahead.
    pub(super) fn id_lead_ms(&self) -> Result<u64, StoreError> {
        Ok(match self.db.get(META_ID_LEAD)? {
            Some(v) => decode_u64(&v).unwrap_or(0),
            None => 0,
        })
    }

    pub(super) fn applied_through(&self) -> Result<u64, StoreError> {
        Ok(match self.db.get(META_LAST_ID)? {
            Some(v) => decode_u64(&v).unwrap_or(0),
            None => 0,
        })
    }

    /// The highest id ever assigned: the stored high-water mark, or any
    /// higher key (belt and braces for a log written by an older version).
    pub(super) fn recover_last_id(&self) -> Result<u64, StoreError> {
        let mut last = self.applied_through()?;
        for prefix in [EVENT_PREFIX, QUARANTINE_PREFIX] {
            if let Some((key, _)) = self.db.scan_prefix([prefix]).next_back().transpose()? {
                last = last.max(decode_u64(&key[1..]).unwrap_or(0));
            }
        }
        Ok(last)
    }

    pub(super) fn quarantine_index(&self) -> Result<VecDeque<(sled::IVec, u64)>, StoreError> {
        let mut index = VecDeque::new();
        for item in self.db.scan_prefix([QUARANTINE_PREFIX]) {
            let (key, value) = item?;
            index.push_back((key, value.len() as u64));
        }
        Ok(index)
    }
}
