//! The committer thread: assigns ids, appends each group commit to the
//! write-ahead log, fsyncs it, answers, and hands the sled writes to the
//! apply thread.

use super::*;

/// Sends entries to the committer and waits for them to be durable.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Message>,
}

impl Committer {
    /// Stores `entry` and returns its id once it is on disk (flushed and
    /// fsynced). A caller that stops waiting must not assume either outcome:
    /// the entry may still become durable.
    pub async fn append(&self, entry: Entry) -> Result<EventId, CommitError> {
        self.submit(entry).await?.await
    }

    /// Queues `entry` for the committer (waiting while its queue is full)
    /// and returns what [`Committer::append`] would then wait for. Dropped
    /// before it returns, the entry is not queued and never stored.
    pub async fn submit(&self, entry: Entry) -> Result<Pending, CommitError> {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            entry,
            received: SystemTime::now(),
            reply,
        };
        self.tx
            .send(Message::Append(request))
            .await
            .map_err(|_| CommitError::Closed)?;
        Ok(Pending(answer))
    }
}

/// A queued entry's outcome: its id once it is durable. Dropping it does
/// not withdraw the entry.
pub struct Pending(oneshot::Receiver<Result<EventId, CommitError>>);

impl std::future::Future for Pending {
    type Output = Result<EventId, CommitError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(CommitError::Closed)))
    }
}

/// Owns the committer thread; [`CommitterHandle::close`] ends it.
pub struct CommitterHandle {
    tx: mpsc::Sender<Message>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    /// Makes the committer count and wake for `subscriptions` from its
    /// next commit on (a reload changed the targets), with `changes`
    /// written at the cut (see [`super::retire`]). Returns the cut, the
    /// last id committed before the change, once the apply thread has
    /// written them: every event above it is for the new targets.
    pub async fn resubscribe(
        &self,
        subscriptions: Vec<Subscription>,
        changes: Vec<TargetChange>,
    ) -> Result<u64, CommitError> {
        let (reply, answer) = oneshot::channel();
        let change = Resubscription {
            subscriptions,
            changes,
            reply,
        };
        self.tx
            .send(Message::Resubscribe(change))
            .await
            .map_err(|_| CommitError::Closed)?;
        answer.await.map_err(|_| CommitError::Closed)?
    }
}

impl CommitterHandle {
    /// Commits everything already queued, makes it durable, and stops the
    /// thread. Appends after this fail with [`CommitError::Closed`].
    pub async fn close(mut self) {
        let _ = self.tx.send(Message::Close).await;
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

pub(super) enum Message {
    Append(Request),
    /// From the next commit on, count and wake for other targets (a
    /// reload).
    Resubscribe(Resubscription),
    Close,
}

/// A reload's change of targets, answered with the cut.
pub(super) struct Resubscription {
    pub(super) subscriptions: Vec<Subscription>,
    pub(super) changes: Vec<TargetChange>,
    pub(super) reply: oneshot::Sender<Result<u64, CommitError>>,
}

pub(super) struct Request {
    pub(super) entry: Entry,
    pub(super) received: SystemTime,
    pub(super) reply: oneshot::Sender<Result<EventId, CommitError>>,
}

/// One group commit as it is built: the sled writes, the write-ahead log
/// frame, the ids in request order, and how many deliveries each
/// subscription got.
pub(super) struct Group {
    writes: Writes,
    frame: Frame,
    ids: Vec<EventId>,
    enqueued: Vec<i64>,
}

/// Everything the committer thread owns: it assigns ids, appends each
/// group commit to the write-ahead log, answers, and hands the sled writes
/// to the apply thread.
pub(super) struct CommitState {
    pub(super) wal: Wal,
    pub(super) apply_tx: std::sync::mpsc::SyncSender<ApplyJob>,
    pub(super) applier: Option<JoinHandle<()>>,
    pub(super) checkpoint_interval: Duration,
    pub(super) last_checkpoint: Instant,
    pub(super) last_id: u64,
    /// Mixed into every id, so that no other relay issues the same.
    pub(super) node: crate::node::NodeId,
    /// See [`META_ID_LEAD`].
    pub(super) id_lead_ms: u64,
    /// Key and size of each quarantined body, oldest first (bounded by the
    /// quarantine limits, so it never grows with traffic).
    pub(super) quarantine: VecDeque<(sled::IVec, u64)>,
    pub(super) quarantine_max_events: usize,
    pub(super) quarantine_max_bytes: u64,
    pub(super) subscriptions: Vec<Subscription>,
    /// Per subscription: the target takes new events from above its
    /// watermark, so a new event gets no queue entry for it.
    pub(super) implicit: Vec<bool>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<CommitHealth>,
}

impl CommitState {
    pub(super) fn run(&mut self, mut rx: mpsc::Receiver<Message>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut closing = false;
        while !closing {
            let mut resubscribe = None;
            match rx.blocking_recv() {
                Some(Message::Append(request)) => batch.push(request),
                Some(Message::Resubscribe(change)) => resubscribe = Some(change),
                Some(Message::Close) | None => closing = true,
            }
            // Everything that queued up while the last commit ran joins this
            // one, up to a change of targets: what came before it is
            // committed for the old ones.
            while batch.len() < MAX_BATCH && resubscribe.is_none() {
                match rx.try_recv() {
                    Ok(Message::Append(request)) => batch.push(request),
                    Ok(Message::Resubscribe(change)) => resubscribe = Some(change),
                    Ok(Message::Close) => closing = true,
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.commit(&mut batch);
            }
            if let Some(change) = resubscribe {
                self.resubscribe(change);
            }
        }
        // Requests still queued behind Close were sent after shutdown began.
        rx.close();
        while let Ok(message) = rx.try_recv() {
            if let Message::Append(request) = message {
                let _ = request.reply.send(Err(CommitError::Closed));
            }
        }
        self.request_checkpoint();
        // The apply thread finishes its queue, checkpoints, and stops.
        let (tx, _) = std::sync::mpsc::sync_channel(1);
        drop(std::mem::replace(&mut self.apply_tx, tx));
        if let Some(applier) = self.applier.take() {
            let _ = applier.join();
        }
    }

    /// Commits `requests` as one group: ids, one write-ahead log frame and
    /// its fdatasync, the answers, then the sled writes to the apply thread.
    pub(super) fn commit(&mut self, requests: &mut Vec<Request>) {
        let started = Instant::now();
        let mut group = Group {
            writes: Writes::default(),
            frame: Frame::new(),
            ids: Vec::with_capacity(requests.len()),
            enqueued: vec![0i64; self.subscriptions.len()],
        };
        for request in requests.iter() {
            let received_at_ms = crate::clock::ms_since_epoch(request.received);
            let id = self.assign_id(received_at_ms, &mut group.writes);
            match &request.entry {
                Entry::Event { event, body } => {
                    self.add_event(&mut group, id, received_at_ms, event, body);
                }
                Entry::Quarantine { reason, body } => {
                    let value = record::encode_quarantine(received_at_ms, reason, body);
                    group.frame.push(wal::KIND_QUARANTINE, id, &value, []);
                    let key = sled::IVec::from(&id_key(QUARANTINE_PREFIX, id));
                    self.quarantine.push_back((key.clone(), value.len() as u64));
                    group.writes.insert(key, value);
                    self.evict_quarantine(&mut group.writes);
                }
            }
            group.ids.push(EventId(id));
        }
        group
            .writes
            .insert(META_LAST_ID, &self.last_id.to_be_bytes());
        self.metrics
            .commit_batch_size
            .observe(requests.len() as f64);
        if self.log_frame(&mut group.frame, requests, started) {
            self.acknowledge(requests, group.ids, started);
            // A full queue (sled far behind) holds the committer back here:
            // senders then feel it as commit time, never as a lost event.
            let _ = self.apply_tx.send(ApplyJob::Batch {
                batch: group.writes,
                enqueued: group.enqueued,
                through: self.last_id,
            });
            if self.last_checkpoint.elapsed() >= self.checkpoint_interval
                || self.wal.len() >= CHECKPOINT_WAL_BYTES
            {
                self.request_checkpoint();
            }
        }
    }

    /// The next id, for an entry received at `received_at_ms`; records in
    /// `writes` how far ids ran ahead of the clock when that is a new high.
    fn assign_id(&mut self, received_at_ms: u64, writes: &mut Writes) -> u64 {
        self.last_id = crate::node::next_id(self.last_id, received_at_ms, self.node);
        let lead_ms = crate::node::id_ms(self.last_id).saturating_sub(received_at_ms);
        if lead_ms > self.id_lead_ms.max(ID_CLOCK_MARGIN_MS) {
            self.id_lead_ms = lead_ms;
            writes.insert(META_ID_LEAD, &lead_ms.to_be_bytes());
        }
        self.last_id
    }

    /// An event's frame entry (with the targets it is for), its record, and
    /// a queue entry for each subscribed target that needs one.
    fn add_event(&self, group: &mut Group, id: u64, received_at_ms: u64, event: &str, body: &[u8]) {
        let value = sled::IVec::from(record::encode_event(received_at_ms, event, body));
        let subscribed = self.subscriptions.iter().filter(|s| s.wants(event));
        group.frame.push(
            wal::KIND_EVENT,
            id,
            &value,
            subscribed.map(|s| s.target.as_str()),
        );
        group.writes.insert(&id_key(EVENT_PREFIX, id), value);
        let state = new_delivery_state(received_at_ms);
        for (n, subscription) in self.subscriptions.iter().enumerate() {
            if !subscription.wants(event) {
                continue;
            }
            let front = self.implicit[n].then_some(subscription.events.as_deref());
            if needs_queue_entry(front, event) {
                let target = &subscription.target;
                group
                    .writes
                    .queue_new(target, received_at_ms, EventId(id), &state);
            }
            group.enqueued[n] += 1;
        }
    }

    /// Appends `frame` to the write-ahead log and fdatasyncs it; on a
    /// failure answers every request with it and returns false.
    fn log_frame(
        &mut self,
        frame: &mut Frame,
        requests: &mut Vec<Request>,
        started: Instant,
    ) -> bool {
        self.health.begin();
        let logged = self.wal.append(frame);
        self.health.end();
        let Err(err) = logged else {
            return true;
        };
        let metrics = &self.metrics;
        metrics
            .commit_duration
            .observe(started.elapsed().as_secs_f64());
        metrics.commit_failures.inc();
        if !self.health.failing.swap(true, Ordering::Relaxed) {
            tracing::error!(error = %err, "log commit failed (write-ahead log); answering 503 until it recovers");
        }
        for request in requests.drain(..) {
            let _ = request.reply.send(Err(CommitError::Failed));
        }
        false
    }

    /// Durable: the write-ahead log has the group. The senders hear so now;
    /// sled gets it right after (its apply costs tens of µs that no ack
    /// waits for), and until a checkpoint the write-ahead log stands for it.
    fn acknowledge(&mut self, requests: &mut Vec<Request>, ids: Vec<EventId>, started: Instant) {
        let metrics = &self.metrics;
        metrics.fsyncs.inc();
        metrics.commits.inc();
        crashpoint::reached(crashpoint::COMMIT_LOGGED);
        if self.health.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("log commits succeed again");
        }
        for (request, id) in requests.drain(..).zip(ids) {
            if matches!(request.entry, Entry::Quarantine { .. }) {
                metrics.quarantined.inc();
            }
            let _ = request.reply.send(Ok(id));
        }
        metrics
            .commit_duration
            .observe(started.elapsed().as_secs_f64());
        if crashpoint::hits(crashpoint::COMMIT_ACKNOWLEDGED) {
            // Let the 200s reach the senders before dying.
            std::thread::sleep(Duration::from_millis(50));
            crashpoint::crash(crashpoint::COMMIT_ACKNOWLEDGED);
        }
    }

    /// Every target a running relay delivers to takes new events from
    /// above its watermark (see [`super::retire`]): none gets queue
    /// entries from a commit. The apply thread writes the changes before
    /// any later commit and answers with the cut.
    pub(super) fn resubscribe(&mut self, change: Resubscription) {
        tracing::info!(cut = self.last_id, "the targets change above this event id");
        self.implicit = vec![true; change.subscriptions.len()];
        self.subscriptions = change.subscriptions.clone();
        let _ = self.apply_tx.send(ApplyJob::Resubscribe {
            writes: TargetChange::write(&change.changes, self.last_id),
            subscriptions: change.subscriptions,
            cut: self.last_id,
            reply: change.reply,
        });
    }

    /// Starts a new write-ahead log segment and asks the apply thread for a
    /// checkpoint covering the older ones.
    pub(super) fn request_checkpoint(&mut self) {
        self.last_checkpoint = Instant::now();
        if self.wal.is_empty() {
            return;
        }
        match self.wal.rotate() {
            Ok(through_seq) => {
                let _ = self.apply_tx.send(ApplyJob::Checkpoint { through_seq });
            }
            Err(err) => {
                self.metrics.commit_failures.inc();
                self.health
                    .checkpoint_failing
                    .store(true, Ordering::Relaxed);
                tracing::error!(error = %err, "cannot start a new write-ahead log segment; will try again");
            }
        }
    }

    /// Drops the oldest quarantined bodies beyond the limits.
    pub(super) fn evict_quarantine(&mut self, batch: &mut Writes) {
        let mut total: u64 = self.quarantine.iter().map(|(_, size)| size).sum();
        while self.quarantine.len() > self.quarantine_max_events
            || (total > self.quarantine_max_bytes && self.quarantine.len() > 1)
        {
            let Some((key, size)) = self.quarantine.pop_front() else {
                break;
            };
            total -= size;
            batch.remove(key);
        }
    }
}

impl Store {
    /// Starts the committer thread. Call once per open log.
    pub fn start_committer(
        &self,
        options: &StoreOptions,
        subscriptions: Vec<Subscription>,
        metrics: Arc<Metrics>,
    ) -> Result<(Committer, CommitterHandle), StoreError> {
        let data_path = self.dir.join("db");
        let data_file = File::options()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(|source| StoreError::DataFile {
                path: data_path,
                source,
            })?;
        let quarantine = self.quarantine_index()?;
        let wal = self
            .wal
            .lock()
            .expect("wal lock")
            .take()
            .expect("the committer starts once per open log");
        let (apply_tx, apply_rx) = std::sync::mpsc::sync_channel(APPLY_QUEUE_DEPTH);
        let mut applier = ApplyState {
            db: self.db.clone(),
            dir: self.dir.clone(),
            data_file,
            sled_missing_commits: false,
            sync_failed: false,
            last_checkpoint_wall: SystemTime::now(),
            subscriptions: subscriptions.clone(),
            metrics: metrics.clone(),
            health: self.health.clone(),
            tallies: self.tallies.clone(),
            applied: self.applied.clone(),
        };
        let applier = std::thread::Builder::new()
            .name("leadflo-apply".to_owned())
            .spawn(move || applier.run(apply_rx))
            .expect("spawning the apply thread");
        let mut state = CommitState {
            wal,
            apply_tx,
            applier: Some(applier),
            checkpoint_interval: options.checkpoint_interval,
            last_checkpoint: Instant::now(),
            last_id: self.recover_last_id()?,
            node: options.node,
            id_lead_ms: self.id_lead_ms()?,
            quarantine,
            quarantine_max_events: options.quarantine_max_events.max(1),
            quarantine_max_bytes: options.quarantine_max_bytes,
            implicit: {
                let fronts = self.fronts.lock().expect("implicit lock");
                subscriptions
                    .iter()
                    .map(|s| fronts.contains_key(&s.target))
                    .collect()
            },
            subscriptions,
            metrics,
            health: self.health.clone(),
        };
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let thread = std::thread::Builder::new()
            .name("leadflo-commit".to_owned())
            .spawn(move || state.run(rx))
            .expect("spawning the committer thread");
        let handle = CommitterHandle {
            tx: tx.clone(),
            thread: Some(thread),
        };
        Ok((Committer { tx }, handle))
    }
}
