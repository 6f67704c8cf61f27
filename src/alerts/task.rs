//! The one task that folds and posts alerts ([`AlertTask`]): one message
//! in flight at a time, a bounded outbox whose oldest goes when full, and
//! a final flush within [`FINAL_WAIT`] when the relay stops. Never holds up
//! a sender: they only ever `try_send`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::alert::{Alert, AlertKind, KindCounts};
use super::count::{AlertResult, count_dropped, count_message};
use super::fold::Folder;
use super::message::Message;
use super::post::{PostError, post};
use super::settings::AlertSettings;
use crate::metrics::Metrics;
use crate::node::NodeId;

/// Messages waiting to be posted; the oldest goes when more come.
const OUTBOX_CAPACITY: usize = 64;
/// How long a stopping relay gives the messages still unsent.
const FINAL_WAIT: Duration = Duration::from_secs(2);

/// The one task that folds and posts alerts.
pub struct AlertTask {
    alerts: mpsc::Receiver<Alert>,
    settings: watch::Receiver<Option<Arc<AlertSettings>>>,
    metrics: Arc<Metrics>,
    folder: Folder,
    outbox: VecDeque<Message>,
    /// The relay's node, named in every message; known once the data
    /// directory is open ([`AlertTask::with_node`]).
    node: Option<NodeId>,
}

/// The post in flight.
struct Posting {
    kind: AlertKind,
    folded: KindCounts,
    task: tokio::task::JoinHandle<Result<(), PostError>>,
}

/// How a post ended.
type Posted = Result<Result<(), PostError>, tokio::task::JoinError>;

impl AlertTask {
    /// A task taking alerts from `alerts`, posting with the latest of
    /// `settings` (see [`super::channel`]).
    pub(super) fn new(
        alerts: mpsc::Receiver<Alert>,
        settings: watch::Receiver<Option<Arc<AlertSettings>>>,
        metrics: Arc<Metrics>,
    ) -> AlertTask {
        AlertTask {
            alerts,
            settings,
            metrics,
            folder: Folder::default(),
            outbox: VecDeque::new(),
            node: None,
        }
    }

    /// Names `node` in every message.
    pub fn with_node(mut self, node: NodeId) -> AlertTask {
        self.node = Some(node);
        self
    }

    /// Folds and posts until `stop`; then posts what was queued and held
    /// back within [`FINAL_WAIT`] (cancel `stop` after the dispatchers and
    /// the disk guard have stopped, so their last alerts are told).
    pub async fn run(mut self, stop: CancellationToken) {
        let mut posting: Option<Posting> = None;
        loop {
            if posting.is_none() {
                posting = self.post_next();
            }
            let flush_at = self.folder.next_due(self.interval());
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(alert) = self.alerts.recv() => self.take(alert),
                done = finished(&mut posting) => {
                    let ended = posting.take().expect("a post was in flight");
                    self.count_post(&ended, done);
                }
                _ = sleep_until(flush_at) => {
                    let due = self.folder.due(Instant::now(), self.interval());
                    for message in due {
                        self.queue_message(message);
                    }
                }
            }
        }
        self.finish(posting).await;
    }

    fn interval(&self) -> Duration {
        self.settings
            .borrow()
            .as_ref()
            .map_or(Duration::from_secs(60), |s| s.min_interval)
    }

    /// Holds `alert`, or queues its message; either way it is counted
    /// when the post that tells it has ended.
    fn take(&mut self, alert: Alert) {
        if let Some(message) = self.folder.offer(alert, Instant::now(), self.interval()) {
            self.queue_message(message);
        }
    }

    fn queue_message(&mut self, message: Message) {
        if self.outbox.len() >= OUTBOX_CAPACITY {
            if let Some(oldest) = self.outbox.pop_front() {
                count_dropped(&self.metrics, &oldest);
            }
        }
        self.outbox.push_back(message);
    }

    /// Starts posting the next message, if any (and if alerts are on).
    fn post_next(&mut self) -> Option<Posting> {
        let Some(settings) = self.settings.borrow().clone() else {
            // Turned off by a reload: what waited is not told.
            for message in self.outbox.drain(..) {
                count_dropped(&self.metrics, &message);
            }
            return None;
        };
        let message = self.outbox.pop_front()?;
        Some(Posting {
            kind: message.alert.kind,
            folded: message.folded,
            task: tokio::spawn(post(settings, message, self.node)),
        })
    }

    fn count_post(&self, posting: &Posting, done: Posted) {
        let message = (posting.kind, &posting.folded);
        let (sent, folded, failed) = (AlertResult::Sent, AlertResult::Folded, AlertResult::Failed);
        let kind = posting.kind.label();
        match done {
            Ok(Ok(())) => count_message(&self.metrics, message, sent, folded),
            Ok(Err(err)) => {
                count_message(&self.metrics, message, failed, failed);
                tracing::warn!(kind, error = %err, "cannot post an alert; it is not tried again");
            }
            Err(err) => {
                count_message(&self.metrics, message, failed, failed);
                tracing::error!(kind, error = %err, "an alert post failed");
            }
        }
    }

    /// The relay stops: what is queued and held back is posted within
    /// [`FINAL_WAIT`], and the rest is counted dropped.
    async fn finish(mut self, mut posting: Option<Posting>) {
        self.alerts.close();
        while let Ok(alert) = self.alerts.try_recv() {
            self.take(alert);
        }
        for message in self.folder.drain() {
            self.queue_message(message);
        }
        let deadline = tokio::time::Instant::now() + FINAL_WAIT;
        loop {
            if posting.is_none() {
                posting = self.post_next();
            }
            let Some(current) = posting.as_mut() else {
                return;
            };
            match tokio::time::timeout_at(deadline, &mut current.task).await {
                Ok(done) => {
                    self.count_post(current, done);
                    posting = None;
                }
                Err(_) => {
                    current.task.abort();
                    let unsent = (current.kind, &current.folded);
                    let dropped = AlertResult::Dropped;
                    count_message(&self.metrics, unsent, dropped, dropped);
                    for message in self.outbox.drain(..) {
                        count_dropped(&self.metrics, &message);
                    }
                    tracing::warn!("alerts still unsent when the relay stopped were dropped");
                    return;
                }
            }
        }
    }
}

/// The end of the post in flight; never, if none is.
async fn finished(posting: &mut Option<Posting>) -> Posted {
    match posting {
        Some(posting) => (&mut posting.task).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
impl AlertTask {
    /// The alerts queued so far.
    pub(crate) fn queued(&mut self) -> Vec<Alert> {
        std::iter::from_fn(|| self.alerts.try_recv().ok()).collect()
    }
}
