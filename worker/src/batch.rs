//! Coalescing the REST calls of many events of one portal into `batch` requests.
//! A `batch` of up to 50 commands costs one request of the portal's leaky bucket, so
//! a burst of events drains in a few requests instead of hundreds. Each event still
//! settles on its own: a command's `result_error` fails only the event it belongs to.
//! The thing to get wrong: Bitrix24 answers a batch with HTTP 200 even when commands
//! failed, and writes an empty map as `[]`, not `{}`.

use crate::bitrix::{Auth, B24Error, Bitrix, ErrorClass};
use crate::handlers::{Failure, Plan};
use b24_shared::event::MemberId;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// A portal's queue task ends after this long without work.
const IDLE: Duration = Duration::from_secs(30);

/// A command that failed transiently inside a batch goes into one of the portal's next
/// batches, after a short pause, this many times before its event is retried through
/// the delay queues (those long rounds are for a portal that stays down).
const COMMAND_TRIES: u32 = 4;

type Reply = oneshot::Sender<Result<Vec<Value>, Failure>>;

struct Job {
    calls: Vec<(&'static str, Value)>,
    reply: Reply,
    tries: u32,
}

pub struct Batcher {
    bitrix: Bitrix,
    max: usize,
    window: Duration,
    queues: Mutex<HashMap<MemberId, mpsc::UnboundedSender<Job>>>,
}

impl Batcher {
    pub fn new(bitrix: Bitrix, max: usize, window: Duration) -> Arc<Self> {
        Arc::new(Self {
            bitrix,
            max: max.clamp(1, 50),
            window,
            queues: Mutex::new(HashMap::new()),
        })
    }

    /// Runs a plan's calls (stored tokens), batched with other plans of its portal;
    /// returns each call's `result` in order.
    pub async fn run(self: &Arc<Self>, plan: &Plan) -> Result<Vec<Value>, Failure> {
        if self.max == 1 || plan.fetches.len() > self.max {
            let mut out = Vec::with_capacity(plan.fetches.len());
            for f in &plan.fetches {
                let a = self
                    .bitrix
                    .call(&plan.member_id, &Auth::Stored, f.method, &f.params)
                    .await?;
                out.push(a.result);
            }
            return Ok(out);
        }
        // Bitrix::call checks the pause of the method it calls, which for a batch is
        // `batch`: the methods inside are checked here.
        for f in &plan.fetches {
            self.bitrix
                .check_method_pause(&plan.member_id, f.method)
                .await?;
        }
        let (reply, answer) = oneshot::channel();
        let mut job = Job {
            calls: plan
                .fetches
                .iter()
                .map(|f| (f.method, f.params.clone()))
                .collect(),
            reply,
            tries: 0,
        };
        // The portal's task may just have ended (idle): then start a new one.
        for _ in 0..2 {
            let tx = self.queue(&plan.member_id);
            match tx.send(job) {
                Ok(()) => {
                    return answer.await.unwrap_or_else(|_| {
                        Err(Failure::Retry {
                            code: "BATCH_ABORTED".into(),
                            reason: "batch task ended before answering".into(),
                            after: None,
                        })
                    })
                }
                Err(mpsc::error::SendError(j)) => {
                    job = j;
                    self.lock().remove(&plan.member_id);
                }
            }
        }
        Err(Failure::Retry {
            code: "BATCH_ABORTED".into(),
            reason: "no batch task for the portal".into(),
            after: None,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MemberId, mpsc::UnboundedSender<Job>>> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn queue(self: &Arc<Self>, member_id: &MemberId) -> mpsc::UnboundedSender<Job> {
        let mut queues = self.lock();
        if let Some(tx) = queues.get(member_id).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        queues.insert(member_id.clone(), tx.clone());
        tokio::spawn(self.clone().portal_loop(member_id.clone(), rx));
        tx
    }

    async fn portal_loop(
        self: Arc<Self>,
        member_id: MemberId,
        mut rx: mpsc::UnboundedReceiver<Job>,
    ) {
        let mut carry: Option<Job> = None;
        loop {
            let first = match carry.take() {
                Some(j) => j,
                None => match tokio::time::timeout(IDLE, rx.recv()).await {
                    Ok(Some(j)) => j,
                    Ok(None) => return,
                    Err(_) => {
                        // Idle: leave, unless a job slipped in while we decided to.
                        let mut queues = self.lock();
                        match rx.try_recv() {
                            Ok(j) => {
                                drop(queues);
                                j
                            }
                            Err(_) => {
                                queues.remove(&member_id);
                                return;
                            }
                        }
                    }
                },
            };
            let mut commands = first.calls.len();
            let mut jobs = vec![first];
            let deadline = tokio::time::Instant::now() + self.window;
            while commands < self.max {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(j)) if commands + j.calls.len() <= self.max => {
                        commands += j.calls.len();
                        jobs.push(j);
                    }
                    Ok(Some(j)) => {
                        carry = Some(j);
                        break;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            self.send(&member_id, jobs).await;
        }
    }

    async fn send(self: &Arc<Self>, member_id: &MemberId, jobs: Vec<Job>) {
        let commands: usize = jobs.iter().map(|j| j.calls.len()).sum();
        self.bitrix
            .rest
            .metrics()
            .batch_size
            .observe(commands as f64);
        if commands == 1 {
            let Some(job) = jobs.into_iter().next() else {
                return;
            };
            let (method, params) = &job.calls[0];
            let r = self
                .bitrix
                .call(member_id, &Auth::Stored, method, params)
                .await
                .map(|a| vec![a.result])
                .map_err(Failure::from);
            let _ = job.reply.send(r);
            return;
        }
        let mut cmd = Map::new();
        for (ji, job) in jobs.iter().enumerate() {
            for (ci, (method, params)) in job.calls.iter().enumerate() {
                cmd.insert(
                    key(ji, ci),
                    Value::String(format!("{method}?{}", encode(params))),
                );
            }
        }
        let answer = self
            .bitrix
            .call(
                member_id,
                &Auth::Stored,
                "batch",
                &json!({ "halt": 0, "cmd": cmd }),
            )
            .await;
        let answer = match answer {
            Ok(a) => a.result,
            Err(e) => {
                let failure = Failure::from(e);
                for job in jobs {
                    let _ = job.reply.send(Err(failure.clone()));
                }
                return;
            }
        };
        let results = as_map(answer.get("result"));
        let errors = as_map(answer.get("result_error"));
        self.record_times(member_id, &jobs, &as_map(answer.get("result_time")))
            .await;
        for (ji, job) in jobs.into_iter().enumerate() {
            let mut out = Vec::with_capacity(job.calls.len());
            let mut failure = None;
            for (ci, (method, _)) in job.calls.iter().enumerate() {
                let k = key(ji, ci);
                if let Some(err) = errors.get(&k) {
                    failure = Some(self.command_failure(member_id, method, err).await);
                    break;
                }
                match results.get(&k) {
                    Some(v) => out.push(v.clone()),
                    None => {
                        failure = Some(Failure::Retry {
                            code: "BATCH_RESULT_MISSING".into(),
                            reason: format!("batch answer has no result for {method}"),
                            after: None,
                        });
                        break;
                    }
                }
            }
            match failure {
                Some(f) if retry_soon(&f) && job.tries + 1 < COMMAND_TRIES => {
                    self.retry_soon(member_id, job, &f);
                }
                Some(f) => {
                    let _ = job.reply.send(Err(f));
                }
                None => {
                    let _ = job.reply.send(Ok(out));
                }
            }
        }
    }

    /// Puts a job whose command failed transiently into one of the portal's next
    /// batches after a short, growing pause.
    fn retry_soon(self: &Arc<Self>, member_id: &MemberId, mut job: Job, failure: &Failure) {
        job.tries += 1;
        let pause = Duration::from_millis(250 * 2u64.pow(job.tries));
        tracing::debug!(%member_id, code = failure.code(), tries = job.tries, ?pause, "batch command failed; retrying soon");
        let tx = self.queue(member_id);
        tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            // If the portal's task is gone the job drops, and its event is retried
            // through the delay queues (the caller sees BATCH_ABORTED).
            let _ = tx.send(job);
        });
    }

    /// Each command's `result_time` carries its method's `operating` total: keep the
    /// latest per method (one write per method, not per command).
    async fn record_times(&self, member_id: &MemberId, jobs: &[Job], times: &Map<String, Value>) {
        let mut latest: HashMap<&str, &Value> = HashMap::new();
        for (ji, job) in jobs.iter().enumerate() {
            for (ci, (method, _)) in job.calls.iter().enumerate() {
                if let Some(t) = times.get(&key(ji, ci)) {
                    let newer = latest
                        .get(method)
                        .is_none_or(|old| operating(t) >= operating(old));
                    if newer {
                        latest.insert(method, t);
                    }
                }
            }
        }
        for (method, time) in latest {
            self.bitrix.record_operating(member_id, method, time).await;
        }
    }

    /// A command's `result_error` entry, classified like a call of its own.
    async fn command_failure(&self, member_id: &MemberId, method: &str, err: &Value) -> Failure {
        let code = err
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("UNKNOWN");
        let desc = err
            .get("error_description")
            .and_then(Value::as_str)
            .unwrap_or("");
        let mut e = B24Error::from_answer(200, code, desc);
        e.status = None;
        if e.class == ErrorClass::MethodPaused {
            e.retry_after = Some(self.bitrix.pause_method(member_id, method).await);
        }
        Failure::from(e)
    }
}

/// Worth a quick retry inside the batcher: a transient answer, not a pause or a hold.
fn retry_soon(f: &Failure) -> bool {
    matches!(f, Failure::Retry { after: None, .. })
}

fn operating(time: &Value) -> f64 {
    time.get("operating").and_then(Value::as_f64).unwrap_or(0.0)
}

fn key(job: usize, call: usize) -> String {
    // Not a bare number: PHP would turn keys 0..n into a list.
    format!("e{job}_{call}")
}

/// `result` and `result_error` are maps, or `[]` when empty (PHP's empty array).
fn as_map(v: Option<&Value>) -> Map<String, Value> {
    match v {
        Some(Value::Object(m)) => m.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v.clone()))
            .collect(),
        _ => Map::new(),
    }
}

/// PHP's `urlencode`, as `http_build_query` applies it.
const PHP_URLENCODE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');

/// A command's parameters as PHP's `http_build_query` writes them, which is how
/// Bitrix24 reads the query string of each `cmd` entry.
pub fn encode(params: &Value) -> String {
    let mut pairs = Vec::new();
    if let Value::Object(o) = params {
        for (k, v) in o {
            push(
                &mut pairs,
                utf8_percent_encode(k, PHP_URLENCODE).to_string(),
                v,
            );
        }
    }
    pairs.join("&")
}

fn push(pairs: &mut Vec<String>, key: String, v: &Value) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                let k = utf8_percent_encode(k, PHP_URLENCODE);
                push(pairs, format!("{key}%5B{k}%5D"), v);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                push(pairs, format!("{key}%5B{i}%5D"), v);
            }
        }
        Value::String(s) => pairs.push(format!("{key}={}", utf8_percent_encode(s, PHP_URLENCODE))),
        Value::Number(n) => pairs.push(format!("{key}={n}")),
        Value::Bool(b) => pairs.push(format!("{key}={}", u8::from(*b))),
        Value::Null => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_encoded_as_php_does() {
        assert_eq!(encode(&json!({"id": 6799})), "id=6799");
        assert_eq!(
            encode(&json!({"entityTypeId": 2, "id": 3473})),
            "entityTypeId=2&id=3473"
        );
        assert_eq!(
            encode(&json!({"filter": {"TITLE": "a b&c"}, "select": ["ID", "TITLE"]})),
            "filter%5BTITLE%5D=a%20b%26c&select%5B0%5D=ID&select%5B1%5D=TITLE"
        );
    }

    #[test]
    fn empty_maps_arrive_as_empty_lists() {
        assert!(as_map(Some(&json!([]))).is_empty());
        assert_eq!(as_map(Some(&json!({"e0_0": 1})))["e0_0"], 1);
        assert!(as_map(None).is_empty());
    }
}
