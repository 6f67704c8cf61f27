//! Reading stored events and quarantined bodies, one or by time.

use super::*;

impl Store {
    /// The stored event with this id.
    pub fn event(&self, id: EventId) -> Result<Option<StoredEvent>, StoreError> {
        let key = id_key(EVENT_PREFIX, id.0);
        match self.db.get(key)? {
            Some(value) => decode_event(&key, &value).map(Some),
            None => Ok(None),
        }
    }

    /// Every stored event, oldest first.
    pub fn events(&self) -> impl Iterator<Item = Result<StoredEvent, StoreError>> + '_ {
        self.db.scan_prefix([EVENT_PREFIX]).map(|item| {
            let (key, value) = item?;
            decode_event(&key, &value)
        })
    }

    /// Every quarantined body, oldest first.
    pub fn quarantined(&self) -> impl Iterator<Item = Result<QuarantinedBody, StoreError>> + '_ {
        self.db.scan_prefix([QUARANTINE_PREFIX]).map(|item| {
            let (key, value) = item?;
            let id = EventId(decode_u64(&key[1..]).unwrap_or(0));
            let q = record::decode_quarantine(&value).map_err(|reason| StoreError::Corrupt {
                key: key.to_vec(),
                reason,
            })?;
            Ok(QuarantinedBody {
                id,
                received_at_ms: q.received_at_ms,
                reason: q.reason.to_owned(),
                body: q.body.to_vec(),
            })
        })
    }

    /// The raw body of a stored event.
    pub fn event_body(&self, id: EventId) -> Result<Option<Bytes>, StoreError> {
        let key = id_key(EVENT_PREFIX, id.0);
        match self.db.get(key)? {
            Some(value) => {
                let r = record::decode_event(&value).map_err(|reason| StoreError::Corrupt {
                    key: key.to_vec(),
                    reason,
                })?;
                Ok(Some(Bytes::copy_from_slice(r.body)))
            }
            None => Ok(None),
        }
    }

    /// Stored events received in `[from_ms, to_ms]`, oldest first. Ids
    /// stand for the receive time (and run ahead of it only under bursts),
    /// so the scan covers just the ids of that time, in either id layout
    /// ([`crate::node::id_ranges`]), plus a margin.
    pub fn events_between(
        &self,
        from_ms: u64,
        to_ms: u64,
    ) -> impl DoubleEndedIterator<Item = Result<StoredEvent, StoreError>> + '_ {
        // Ids ran further ahead of the clock once (it was set back): the
        // scan widens by that much too.
        let margin = ID_CLOCK_MARGIN_MS.max(self.id_lead_ms().unwrap_or(0).saturating_add(1));
        crate::node::id_ranges(from_ms, to_ms.saturating_add(margin))
            .into_iter()
            .filter(|(start, end)| start <= end)
            .flat_map(|(start, end)| {
                self.db
                    .range(id_key(EVENT_PREFIX, start)..=id_key(EVENT_PREFIX, end))
            })
            .map(|item| {
                let (key, value) = item?;
                decode_event(&key, &value)
            })
            .filter(move |event| match event {
                Ok(e) => e.received_at_ms >= from_ms && e.received_at_ms <= to_ms,
                Err(_) => true,
            })
    }
}
