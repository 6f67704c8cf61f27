//! Opening the log after a crash: what the write-ahead log holds beyond sled
//! is written into sled again, and the marks that say how far each part got.

use super::*;

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
        let mut batch = Writes::default();
        let mut last = self.recover_last_id()?;
        let mut replayed = 0;
        let mut adopted = std::collections::HashMap::new();
        let mut lead_ms = self.id_lead_ms()?;
        for entry in entries.iter().filter(|e| e.id > durable) {
            let id = entry.id;
            match entry.kind {
                wal::KIND_EVENT => {
                    let received_at_ms = received_at(&id_key(EVENT_PREFIX, id), &entry.value)?;
                    lead_ms = lead_ms.max(crate::node::id_ms(id).saturating_sub(received_at_ms));
                    batch.insert(&id_key(EVENT_PREFIX, id), entry.value.as_slice());
                    let state = new_delivery_state(received_at_ms);
                    let event = decode_event_record(&id_key(EVENT_PREFIX, id), &entry.value)?.event;
                    for target in &entry.targets {
                        // A target whose watermark takes this type reads
                        // it above the watermark: no queue entry. One whose
                        // types a reload changed, and which crashed before
                        // the new watermark was written, still has the old.
                        let stored = match adopted.get(target) {
                            Some(stored) => stored,
                            None => {
                                let stored =
                                    self.stored_watermark(target)?.map(|(_, events)| events);
                                adopted.entry(target.clone()).or_insert(stored)
                            }
                        };
                        let implicit = stored
                            .as_ref()
                            .is_some_and(|events| takes(events.as_deref(), event));
                        if !implicit {
                            batch.queue_new(target, received_at_ms, EventId(id), &state);
                        }
                    }
                }
                _ => batch.insert(&id_key(QUARANTINE_PREFIX, id), entry.value.as_slice()),
            }
            last = last.max(id);
            replayed += 1;
        }
        batch.insert(META_LAST_ID, &last.to_be_bytes());
        if lead_ms > ID_CLOCK_MARGIN_MS {
            batch.insert(META_ID_LEAD, &lead_ms.to_be_bytes());
        }
        let io = |source: std::io::Error| StoreError::DataFile {
            path: self.dir.clone(),
            source,
        };
        self.db.apply_batch(batch.into_batch())?;
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
