//! Load for availability tests: senders that post leads on fresh
//! connections (as a webhook sender does) and record every answer, and
//! the check that every accepted lead was delivered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leadflo_relay::store::EventId;

use super::receiver::Receiver;
use super::{SECRET, eventually, try_post};

const WAIT: Duration = Duration::from_secs(30);

/// A small lead, numbered `n`.
pub fn lead(n: usize) -> Vec<u8> {
    format!(r#"{{"event":"visitor_created","data":{{"visitor":{{"id":"vis_{n}"}}}}}}"#).into_bytes()
}

/// What a sender that never retries saw of one POST.
#[derive(Debug, Clone)]
pub enum Answer {
    Accepted { id: EventId, body: Vec<u8> },
    Refused(String),
}

/// Posts leads to `url` one after another on a fresh connection each (as
/// a webhook sender does) until `stop` is cancelled, at most `max` of them.
pub struct Sender {
    answers: Arc<Mutex<Vec<Answer>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Sender {
    /// `parallel` senders, each posting leads one after another.
    pub fn start(url: String, first: usize, max: usize, parallel: usize) -> Sender {
        let answers = Arc::new(Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let tasks: Vec<_> = (0..parallel)
            .map(|lane| {
                let (answers, stop, url) = (answers.clone(), stop.clone(), url.clone());
                tokio::spawn(async move {
                    leadflo_relay::deliver::install_crypto_provider();
                    let client = reqwest::Client::builder()
                        .pool_max_idle_per_host(0)
                        .timeout(Duration::from_secs(5))
                        .build()
                        .unwrap();
                    for n in (first + lane..first + max).step_by(parallel) {
                        if stop.is_cancelled() {
                            break;
                        }
                        let body = lead(n);
                        let answer =
                            match post_lenient(&client, &url, Some(SECRET), body.clone()).await {
                                (200, json) => Answer::Accepted {
                                    id: json["id"].as_str().unwrap().parse().unwrap(),
                                    body,
                                },
                                (status, json) => Answer::Refused(format!("{status} {json}")),
                            };
                        answers.lock().unwrap().push(answer);
                    }
                })
            })
            .collect();
        let task = tokio::spawn(async move {
            for task in tasks {
                task.await.unwrap();
            }
        });
        Sender {
            answers,
            stop,
            task,
        }
    }

    /// The answers so far.
    pub fn answers(&self) -> Vec<Answer> {
        self.answers.lock().unwrap().clone()
    }

    pub fn sent(&self) -> usize {
        self.answers.lock().unwrap().len()
    }

    /// Waits until `more` answers came after the ones seen now.
    pub async fn wait_for(&self, more: usize) {
        let target = self.sent() + more;
        eventually("the sender to get its answers", WAIT, async || {
            (self.sent() >= target).then_some(())
        })
        .await;
    }

    pub async fn finish(self) -> Vec<Answer> {
        self.stop.cancel();
        self.task.await.unwrap();
        Arc::try_unwrap(self.answers).unwrap().into_inner().unwrap()
    }
}

/// [`try_post`], with a request that got no answer as status 0 and why,
/// and a body that is not JSON (HAProxy's own pages) as a JSON string.
pub async fn post_lenient(
    client: &reqwest::Client,
    url: &str,
    secret: Option<&str>,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    match try_post(client, url, secret, body).await {
        Ok((status, text)) => (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        ),
        Err(err) => (0, serde_json::Value::String(format!("{err:?}"))),
    }
}

pub fn refused(answers: &[Answer]) -> Vec<&String> {
    answers
        .iter()
        .filter_map(|a| match a {
            Answer::Refused(why) => Some(why),
            Answer::Accepted { .. } => None,
        })
        .collect()
}

/// Every accepted lead reached `crm`, and no idempotency key came with two
/// different bodies.
pub async fn assert_every_lead_delivered_once_per_key(answers: &[Answer], crm: &Receiver) {
    let accepted: HashMap<String, &Vec<u8>> = answers
        .iter()
        .filter_map(|a| match a {
            Answer::Accepted { id, body } => Some((id.to_string(), body)),
            Answer::Refused(_) => None,
        })
        .collect();
    let delivered = eventually("every accepted lead delivered", WAIT, async || {
        let mut by_key: HashMap<String, Vec<u8>> = HashMap::new();
        for request in crm.requests() {
            let key = request.header("idempotency-key").to_owned();
            if let Some(other) = by_key.insert(key.clone(), request.body.clone()) {
                assert_eq!(
                    other, request.body,
                    "idempotency key {key} came with two bodies"
                );
            }
        }
        accepted
            .keys()
            .all(|id| by_key.contains_key(id))
            .then_some(by_key)
    })
    .await;
    for (id, body) in &accepted {
        assert_eq!(
            &delivered[id], *body,
            "event {id} was delivered with another body"
        );
    }
}
